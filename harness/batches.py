"""
Padding and batching for the loss pass: lists of token ids -> the tensors a forward needs, and how
a batch of rollouts is split so that each pass pads little. train_grpo.py calls these; the tests
of its loss pass cover them.
"""
import torch


def completion_mask(lengths, C):
    """(N, C) float: 1 on each completion's tokens, 0 on the right padding."""
    return (torch.arange(C)[None, :] < torch.as_tensor(lengths)[:, None]).float()


def padded_logprobs(comps):
    """The sampler's log-probs as a right-padded tensor (N, C), C = the longest completion."""
    out = torch.zeros(len(comps), max(len(c["ids"]) for c in comps))
    for i, c in enumerate(comps):
        out[i, :len(c["logprobs"])] = torch.tensor(c["logprobs"])
    return out


def left_pad(seqs, length):
    """ids and mask (b, length), each sequence right-aligned."""
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, length - len(s):] = 1
    return ids, mask


def length_runs(lengths, ratio=1.5):
    """Positions sorted by length, cut into runs whose longest is at most `ratio` × their shortest:
    a run pads only to its own longest, so one cut-off sample no longer pads every other."""
    runs = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if runs and lengths[i] <= ratio * max(1, lengths[runs[-1][0]]):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def micro_batches(lengths, micro_batch, G=1, max_tokens=0):
    """Split positions 0..len(lengths)-1 (G consecutive samples per group) into micro-batches of
    whole groups: at most max(micro_batch, G) samples and, if max_tokens, about that many padded
    tokens. Groups go longest first, so each pass pads to lengths close to its own. lengths: (Lp, C)
    each."""
    def longest(s):
        return -max(sum(lengths[i]) for i in range(s, s + G))

    out, cur = [], []
    for s in sorted(range(0, len(lengths), G), key=longest):
        nxt = cur + list(range(s, s + G))
        Lp, C = max(lengths[i][0] for i in nxt), max(lengths[i][1] for i in nxt)
        tokens = len(nxt) // G * Lp + len(nxt) * C if G > 1 else len(nxt) * (Lp + C)
        if cur and (len(nxt) > micro_batch or max_tokens and tokens > max_tokens):
            out.append(cur)
            nxt = list(range(s, s + G))
        cur = nxt
    return out + [cur]
