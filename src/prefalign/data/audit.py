"""`prefalign data check`: what a data source holds and the problems that silently ruin training.

``audit`` is pure (path in, report dict out); ``run_data_check`` prints it and sets the exit
code: 0 when the file is usable for training, 2 when not (the reasons are printed).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

from prefalign.data.formats import FORMATS
from prefalign.data.records import KIND_NAMES, ParsedFile, PreferenceExample, half_pair_warning, parse_file
from prefalign.data.tokenize import encode_preference, encode_prompt, encode_prompt_completion, encode_text
from prefalign.errors import DataError, PrefalignError

FIRST = 5          # how many line numbers to show per finding
BIAS_WARN = 0.10   # warn when the chosen-is-longer share is further than this from one half


def _stats(values: list[int]) -> dict:
    """min / median / p95 (nearest rank) / max of a non-empty list."""
    v = sorted(values)
    if not v:
        return {}
    mid = len(v) // 2
    median = v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2
    p95 = v[min(len(v) - 1, max(0, -(-95 * len(v) // 100) - 1))]
    return {"min": v[0], "median": median, "p95": p95, "max": v[-1]}


def _chars(x) -> int:
    if x is None:
        return 0
    return sum(len(m["content"]) for m in x) if isinstance(x, list) else len(x)


def _blank(x) -> bool:
    return not x or (all(not m["content"].strip() for m in x) if isinstance(x, list) else not x.strip())


def _finding(lines: list[int], **extra) -> dict:
    return {"count": len(lines), "first": lines[:FIRST], **extra}


def _share_longer(pairs: list[tuple[int, int]]) -> Optional[float]:
    return round(sum(a > b for a, b in pairs) / len(pairs), 4) if pairs else None


def _tokenizer_findings(pf: ParsedFile, kind: str, tokenizer, max_length: int, mpl: Optional[int]) -> dict:
    """Token lengths before truncation, and what truncation at this budget would do."""
    lengths = defaultdict(list)
    truncated, hidden, longer = [], [], []
    for n, _, p in pf.parsed:
        if p.skip:
            continue
        f, src = p.fields, pf.source(n)
        if kind == "preference":
            c, r = encode_preference(tokenizer, PreferenceExample(f["prompt"], f["chosen"], f["rejected"], source=src),
                                     max_length, mpl)
            full_c = len(c.completion_ids) + c.completion_cut
            full_r = len(r.completion_ids) + r.completion_cut
            lengths["prompt"].append(c.prompt_len + c.prompt_cut)
            lengths["chosen"].append(full_c)
            lengths["rejected"].append(full_r)
            longer.append((full_c, full_r))
            if c.prompt_cut or c.completion_cut or r.completion_cut:
                truncated.append(n)
            if c.input_ids == r.input_ids:
                hidden.append(n)
        elif kind == "sft":
            t = (encode_text(tokenizer, f["completion"], max_length) if f["prompt"] is None else
                 encode_prompt_completion(tokenizer, f["prompt"], f["completion"], max_length, mpl, source=src))
            lengths["prompt"].append(t.prompt_len + t.prompt_cut)
            lengths["completion"].append(len(t.completion_ids) + t.completion_cut)
            if t.prompt_cut or t.completion_cut:
                truncated.append(n)
        else:
            ids = encode_prompt(tokenizer, f["prompt"])
            lengths["prompt"].append(len(ids))
            if len(ids) > (mpl or max_length // 2):
                truncated.append(n)
    out = {"tokens": {k: _stats(v) for k, v in lengths.items()}, "truncated": _finding(truncated)}
    if kind == "preference":
        out["truncation_hides_difference"] = _finding(hidden)
        out["chosen_longer_tokens"] = _share_longer(longer)
    return out


def _preference_findings(pf: ParsedFile) -> dict:
    empty = {"chosen": [], "rejected": []}
    longer = []
    for n, _, p in pf.parsed:
        if p.skip:
            continue
        for side in ("chosen", "rejected"):
            if _blank(p.fields[side]):
                empty[side].append(n)
        longer.append((_chars(p.fields["chosen"]), _chars(p.fields["rejected"])))
    both = sorted(set(empty["chosen"]) | set(empty["rejected"]))
    return {"empty_completion": _finding(both, chosen=len(empty["chosen"]), rejected=len(empty["rejected"])),
            "chosen_longer_chars": _share_longer(longer)}


def audit(path, data_format: Optional[str] = None, tokenizer=None, max_length: int = 512,
          max_prompt_length: Optional[int] = None, **source) -> dict:
    """A report on one data source (docs/data.md describes the fields); ``source`` holds
    ``open_source``'s options (split, config, revision, columns)."""
    report: dict = {"path": str(path), "usable": False, "reasons": [], "warnings": []}
    try:
        pf = parse_file(path, data_format, **source)
    except DataError as e:
        report["reasons"].append(str(e))
        return report
    report["path"] = pf.path  # a Hub id or folder gains its split
    kinds = sorted({FORMATS[name].kind for name in pf.formats})
    kind = kinds[0] if len(kinds) == 1 else None
    skipped, notes, half_pairs = defaultdict(list), defaultdict(list), defaultdict(list)
    for n, _, p in pf.parsed:
        if p.skip:
            skipped[p.skip].append(n)
        if p.note:
            notes[p.note].append(n)
        if p.warn:
            half_pairs[p.warn].append(n)
    usable = sum(1 for _, _, p in pf.parsed if not p.skip)
    report.update({
        "container": pf.container,
        "records": pf.n_records, "numbered_by": pf.numbered_by,
        "formats": dict(pf.formats), "kind": kind, "usable_records": usable,
        "errors": {"count": len(pf.errors), "first": [str(e) for e in pf.errors[:FIRST]]},
        "skipped": {reason: _finding(lines) for reason, lines in skipped.items()},
        "notes": {note: _finding(lines) for note, lines in notes.items()},
        "half_pairs": {warn: _finding(lines) for warn, lines in half_pairs.items()},
        "budget": {"max_length": max_length, "max_prompt_length": max_prompt_length or max_length // 2},
    })
    if kind == "preference":
        report.update(_preference_findings(pf))
    if tokenizer is not None and kind is not None and not pf.errors:
        report["eos_token"] = tokenizer.eos_token
        if tokenizer.eos_token_id is None:
            report["reasons"].append("the tokenizer has no EOS token: completions could not be terminated and the "
                                     "model would never learn to stop; set eos_token in the tokenizer config.")
        else:
            try:
                report.update(_tokenizer_findings(pf, kind, tokenizer, max_length, max_prompt_length))
            except PrefalignError as e:
                report["reasons"].append(str(e))
    _judge(report)
    return report


def _judge(report: dict) -> None:
    """Fill ``usable``, ``reasons`` (why not usable) and ``warnings`` (usable, but look)."""
    reasons, warnings, by = report["reasons"], report["warnings"], report["numbered_by"]
    if report["errors"]["count"]:
        reasons.append(f"{report['errors']['count']} record(s) cannot be used (first: {report['errors']['first'][0]})")
    if report["kind"] is None and report["formats"]:
        reasons.append("the records mix preference, supervised and prompt formats; a file holds one kind.")
    if report["usable_records"] == 0 and not reasons:
        reasons.append("no usable records.")
    for reason, f in report["skipped"].items():
        warnings.append(f"{f['count']} record(s) skipped: {reason} ({_lines(f, by)}).")
    for warn, f in report["half_pairs"].items():
        warnings.append(f"{half_pair_warning(f['count'], warn)[:-1]} ({_lines(f, by)}). Add the missing field to "
                        "train on pairs, or drop the reply to silence this.")
    empty = report.get("empty_completion")
    if empty and empty["count"]:
        warnings.append(f"{empty['count']} pair(s) with an empty (whitespace-only) completion: chosen {empty['chosen']}, "
                        f"rejected {empty['rejected']} ({_lines(empty, by)}); training teaches to prefer or "
                        "avoid saying nothing.")
    hidden = report.get("truncation_hides_difference")
    if hidden and hidden["count"]:
        b = report["budget"]
        warnings.append(f"{hidden['count']} pair(s) become identical after truncation to max_length={b['max_length']}, "
                        f"max_prompt_length={b['max_prompt_length']} ({_lines(hidden, by)}): the part where chosen "
                        "and rejected differ is cut away; raise --max-length.")
    for unit in ("chars", "tokens"):
        share = report.get(f"chosen_longer_{unit}")
        if share is not None and abs(share - 0.5) > BIAS_WARN and report["usable_records"] >= 20:
            warnings.append(f"length bias: chosen is longer than rejected in {share:.1%} of pairs ({unit}); a reward "
                            "model can learn length instead of quality.")
    report["usable"] = not reasons


def _lines(f: dict, by: str) -> str:
    more = ", ..." if f["count"] > len(f["first"]) else ""
    return f"{by}{'s' if f['count'] > 1 else ''} " + ", ".join(map(str, f["first"])) + more


# --------------------------------------------------------------------------- printing

def format_report(report: dict) -> str:
    """The report as text for people."""
    out = [f"data check: {report['path']}"]
    if "formats" not in report:
        out.append(f"  cannot read the file: {report['reasons'][0]}")
        out.append("verdict: NOT usable (exit 2)")
        return "\n".join(out)
    fmt = ", ".join(f"{name} {n}" for name, n in sorted(report["formats"].items(), key=lambda kv: -kv[1])) or "none"
    kind = KIND_NAMES.get(report["kind"], "mixed kinds")
    out += [f"  records: {report['records']} ({report['container']}); usable: {report['usable_records']}",
            f"  formats: {fmt} -> {kind}"]
    if report["errors"]["count"]:
        out.append(f"  records that cannot be used: {report['errors']['count']}")
        out += [f"    {e}" for e in report["errors"]["first"]]
    if not report["skipped"]:
        out.append("  skipped: none")  # skips are listed with the warnings
    for note, f in report["notes"].items():
        out.append(f"  note: {f['count']} record(s): {note} ({_lines(f, report['numbered_by'])})")
    if "chosen_longer_chars" in report:
        out.append(f"  chosen longer than rejected: {_pct(report['chosen_longer_chars'])} of pairs (characters)"
                   + (f", {_pct(report['chosen_longer_tokens'])} (tokens)" if "chosen_longer_tokens" in report else ""))
    if "tokens" in report:
        b = report["budget"]
        out.append(f"  tokens before truncation (eos token {report['eos_token']!r}):")
        out.append(f"    {'':<10} {'min':>7} {'median':>7} {'p95':>7} {'max':>7}")
        for name, s in report["tokens"].items():
            if s:
                out.append(f"    {name:<10} {s['min']:>7} {s['median']:>7g} {s['p95']:>7} {s['max']:>7}")
        out.append(f"  truncated at max_length={b['max_length']}, max_prompt_length={b['max_prompt_length']}: "
                   f"{report['truncated']['count']} record(s)")
    elif "eos_token" not in report:
        out.append("  tokens: give --model DIR for token lengths and truncation checks")
    out += [f"  warning: {w}" for w in report["warnings"]]
    out += [f"  problem: {r}" for r in report["reasons"]]
    out.append("verdict: usable (exit 0)" if report["usable"] else "verdict: NOT usable (exit 2)")
    return "\n".join(out)


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.1%}"
