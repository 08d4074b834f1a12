"""
The statistics every report uses, as pure functions: 95% Wilson score intervals (sound near 0% and
100%, unlike the normal one) and the exact two-sided McNemar test on paired verdicts.
"""
import math


def wilson(k, n, z=1.959964):
    """95% Wilson score interval for k successes in n trials."""
    if n == 0:
        return (0.0, 1.0)
    p, d = k / n, 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, mid - half), min(1.0, mid + half))


def mcnemar_exact(b, c):
    """Two-sided exact McNemar p-value: b = right only in A, c = right only in B (binomial, 1/2)."""
    tail = sum(math.comb(b + c, i) for i in range(min(b, c) + 1)) / 2 ** (b + c)
    return min(1.0, 2 * tail)
