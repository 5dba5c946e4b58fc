"""Reports of compared rows: terminal table, versioned JSON, JUnit XML.

JSON schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "passed": bool,              # no row FAIL
      "first_failure": row | null, # the place the two programs part
      "counts": {"PASS": n, "FAIL": n, "KNOWN": n, "SKIP": n},
      "config": {...},             # parity.config.Config.to_dict(), or a list
      "versions": {"python":, "numpy":, "torch":, "tensorflow":, "parity":},
      "tolerances": {dtype: {class: {"rtol":, "atol":}}},
      "rows": [row, ...],          # parity.compare.Row.to_dict()
      ...                          # extra sections (training, sweep, ...)
    }
"""

import collections
import dataclasses
import json
import math
import os
import platform
import re
import sys
import tempfile
import xml.etree.ElementTree as ET

from parity import __version__, tolerances

__all__ = [
    "SCHEMA_VERSION",
    "atomic_write",
    "check_output_path",
    "umask_mode",
    "exit_code",
    "format_table",
    "summary",
    "versions",
    "write_json",
    "write_junit",
]

SCHEMA_VERSION = 1


def _fmt_index(index):
    return "(" + ",".join(str(i) for i in index) + ")" if index else "()"


def format_table(rows, *, title=None):
    """The rows as a fixed-width text table, one line per row."""
    lines = []
    if title:
        lines.append(title)
    header = (
        f"{'quantity':<44} {'shape':<16} {'max abs':>10} {'at':<14} "
        f"{'max rel':>10} {'at':<14} {'rtol':>7} {'atol':>7} status"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for r in rows:
        shape = "x".join(str(s) for s in r.shape) or "scalar"
        lines.append(
            f"{r.key:<44} {shape:<16} {r.max_abs:>10.3g} "
            f"{_fmt_index(r.abs_index):<14} {r.max_rel:>10.3g} "
            f"{_fmt_index(r.rel_index):<14} {r.rtol:>7.0e} {r.atol:>7.0e} {r.status}"
        )
        if r.status in ("FAIL", "KNOWN") and r.message:
            lines.append(f"    {r.message}")
    return "\n".join(lines)


def summary(rows):
    """One paragraph: counts, and the first failing row as the parting place."""
    counts = collections.Counter(r.status for r in rows)
    text = ", ".join(
        f"{counts.get(s, 0)} {s}" for s in ("PASS", "FAIL", "KNOWN", "SKIP")
    )
    first = next((r for r in rows if r.failed), None)
    if first is None:
        return f"rows {len(rows)}: {text}. result PASS"
    return (
        f"rows {len(rows)}: {text}. result FAIL. The two programs part first "
        f"at {first.key}: {first.message}"
    )


def exit_code(rows):
    """0 when no row failed, 1 otherwise."""
    return 1 if any(r.failed for r in rows) else 0


def versions():
    """Versions of the frameworks that are imported in this process."""
    out = {"python": platform.python_version(), "parity": __version__}
    for name in ("numpy", "torch", "tensorflow", "onnx", "onnxruntime"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", "unknown")
    return out


def check_output_path(path, argument):
    """Checks, before any work, that a report can be written at `path`.

    Creates missing parent folders, as the write would.

    Raises:
        ValueError: if `path` is empty, a folder, or under something that is
            not a writable folder.
    """
    if not path:
        raise ValueError(f"{argument} needs a file path. Received: {argument}={path!r}")
    if os.path.isdir(path):
        raise ValueError(
            f"{argument} must name a file, not a folder. Received: {argument}={path!r}"
        )
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"{argument} cannot be written there ({e.strerror}). "
            f"Received: {argument}={path!r}"
        ) from e
    if not os.access(folder, os.W_OK):
        raise ValueError(
            f"{argument} is in a folder this process cannot write. "
            f"Received: {argument}={path!r}"
        )


def umask_mode():
    """The mode a new file gets here: 0666 less the umask."""
    # mkstemp creates 0600; a report should get the usual 0666 & ~umask.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path, data, mode="w"):
    """Writes `data` to `path` through a temporary file and a rename.

    An interrupted write leaves any previous file at `path` intact.

    Args:
        path: the file to write.
        data: text or bytes, or a callable that writes the temporary file
            whose path it is given (for writers that want a path, such as
            matplotlib's savefig).
        mode: the file mode for text or bytes.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=folder, prefix=".tmp-", suffix=os.path.basename(path)
    )
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, mode) as f:
                f.write(data)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _tolerance_table():
    return {
        dtype: {cls: dataclasses.asdict(t) for cls, t in table.items()}
        for dtype, table in tolerances.TOLERANCES.items()
    }


def to_document(rows, *, config=None, extra=None):
    """The JSON document of the schema above, as a dict."""
    first = next((r for r in rows if r.failed), None)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "passed": not any(r.failed for r in rows),
        "first_failure": first.to_dict() if first else None,
        "counts": dict(collections.Counter(r.status for r in rows)),
        "config": config,
        "versions": versions(),
        "tolerances": _tolerance_table(),
        "rows": [r.to_dict() for r in rows],
    }
    if extra:
        doc.update(extra)
    return doc


def _finite(value):
    """`value` with non-finite floats as the strings "nan", "inf", "-inf".

    Strict JSON has no NaN or Infinity; a report must parse everywhere.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write to JSON. Received: {type(value).__name__}")


def write_json(path, *, rows, config=None, extra=None):
    """Writes the JSON report to `path` atomically."""
    doc = to_document(rows, config=config, extra=extra)
    # Round trip through the encoder first so numpy values become floats.
    doc = _finite(json.loads(json.dumps(doc, default=_json_default)))
    atomic_write(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")


# Characters XML 1.0 cannot hold, which a plug-in's error text may carry.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(text):
    return _XML_INVALID.sub("?", text)


def write_junit(path, rows, name="parity"):
    """Writes JUnit XML, one test case per row, atomically."""
    failures = sum(r.failed for r in rows)
    skipped = sum(r.status in ("SKIP", "KNOWN") for r in rows)
    suite = ET.Element(
        "testsuite",
        name=name,
        tests=str(len(rows)),
        failures=str(failures),
        skipped=str(skipped),
    )
    for r in rows:
        case = ET.SubElement(suite, "testcase", classname=name, name=_xml_text(r.key))
        message = _xml_text(r.message)
        if r.failed:
            ET.SubElement(case, "failure", message=message[:200]).text = message
        elif r.status in ("SKIP", "KNOWN"):
            ET.SubElement(case, "skipped", message=message[:200] or r.status)
    data = ET.tostring(ET.ElementTree(suite).getroot(), encoding="unicode")
    atomic_write(path, '<?xml version="1.0" encoding="utf-8"?>\n' + data + "\n")
