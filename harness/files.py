"""
Files the project reads and writes besides the adapter (tinylora.py keeps its own, to stay one
copyable file): JSONL read with each defect a one-line ValueError naming the file and line, and
every other write made whole, to a temporary name renamed into place, so a kill never leaves half
a file under the real name.
"""
import json
import os


def read_jsonl(path, with_lines=False):
    """The objects of a JSONL file, blank lines skipped ([] for an empty file); with_lines: as
    (line number, object) pairs, for errors that name the line. Any defect: one ValueError."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        try:
            out += [(i, json.loads(line))] if line.strip() else []
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path} line {i}: not valid JSON ({str(e)[:80]})") from None
    return out if with_lines else [obj for _, obj in out]


def append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def write_atomic(path, write):
    """write(tmp_path) writes the file under a temporary name; it then replaces `path` whole."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_jsonl(path, rows):
    """Rows as a JSONL file, written whole."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return write_atomic(path, write)


def write_json(path, obj):
    """An object as an indented JSON file, written whole (values JSON lacks: as strings)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, default=str)
    return write_atomic(path, write)
