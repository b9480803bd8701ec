"""Resumable evaluation runs: one JSON line per finished caption (or POPE answer).

Files in the out dir (TAG names the method, e.g. "greedy", "vhr-a2"):

    ids.json                    the evaluated image ids and where they came from (data.write_ids)
    chair-TAG.jsonl             {"image_id", "caption", "gt_objects", "mentioned", "hallucinated",
                                 "negated", "timings"} per image
    chair-TAG.run.json          the settings of the run (model, mmproj, VHR, generation, data)
    chair-TAG.summary.json      {"n", "chair_s", "chair_i", "recall", "mean_len", ...} at the end
    pope-questions.json         the question sets of the POPE splits
    pope-TAG.jsonl              {"image_id", "object", "question", "answer", "pred", "timings"}
    pope-TAG.summary.json       per split {"n", "accuracy", "precision", "recall", "f1", "yes_ratio"}

Resuming: each line is written with a single write() on an O_APPEND descriptor, so a killed
run leaves at most one partial line at the end. On start the file is read, a trailing partial
line is cut off (the file is truncated to its last newline), and ids already present are
skipped; a line is never written twice. A settings file that differs from the current settings
stops the run (use another --out or --tag) instead of mixing two methods in one file.
Summaries are recomputed from the captions of all lines, so they follow the current rules.
Each line is fsync'ed as it is written (a line counts only once it is on disk).

The work itself is a captioner (answerer for POPE): a function called once per item, in order,
or an object with `map_unordered(units)` that yields (index, result) as results finish anywhere
(`cluster.Pool` on Ray). Either way this module alone writes the file. A result may be a
`Failed` (a unit that failed on every try): it is written as a row with "error" and "tries"
(once per id), left out of the scores (the summary says "n_failed"), and tried again by the
next start; a later success is appended and wins, so every id has exactly one result line.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from ..errors import ConfigError, ImageError
from . import chair, pope
from .data import DataError, DataSource, Item, write_ids


@dataclass
class Failed:
    """A unit that failed on every try (on Ray: its worker died, or the caption raised)."""

    error: str
    tries: int


class JsonlStore:
    """An append-only JSON-lines file keyed by `key(record)`; survives kills (see module doc).
    Records with an "error" field are failures: kept in `failed`, not `done`, until a success."""

    def __init__(self, path, key: Callable[[dict], str]):
        self.path = Path(path)
        self.key = key
        self.done: dict[str, dict] = {}
        self.failed: dict[str, dict] = {}
        self.dropped_partial = 0  # bytes of a partial last line cut off on open
        self._recover()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _recover(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        cut = data.rfind(b"\n") + 1
        if cut < len(data):
            self.dropped_partial = len(data) - cut
            with open(self.path, "r+b") as f:
                f.truncate(cut)
            data = data[:cut]
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                k = self.key(rec)
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{self.path} line {n} is not a result line of this run; "
                                "use another --out") from None
            if "error" in rec:
                self.failed[k] = rec
            else:
                self.done.setdefault(k, rec)
        for k in self.done:
            self.failed.pop(k, None)

    def __contains__(self, k: str) -> bool:
        return k in self.done

    def add(self, rec: dict) -> None:
        k = self.key(rec)
        if k in self.done or ("error" in rec and k in self.failed):  # one failed row per id is enough
            return
        buf = (json.dumps(rec) + "\n").encode()
        while buf:  # one write() for a line in practice; loop only if the OS writes part of it
            n = os.write(self._fd, buf)
            buf = buf[n:]
        os.fsync(self._fd)
        if "error" in rec:
            self.failed[k] = rec
        else:
            self.done[k] = rec
            self.failed.pop(k, None)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "JsonlStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def check_settings(path: Path, settings: dict) -> None:
    """Write `settings` to path, or make sure an existing file holds the same settings."""
    norm = json.loads(json.dumps(settings))
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise DataError(f"{path} is not a settings file written by vhr-edge eval; use another --out") from None
        if old != norm:
            diff = sorted(k for k in set(old) | set(norm) if old.get(k) != norm.get(k))
            raise ConfigError(f"{path.parent} holds a run '{path.name.rsplit('.run.json', 1)[0]}' made with other "
                              f"settings (differing: {', '.join(diff)}); use another --out or --tag")
        return
    _write_json(path, norm)


def _progress(total: int, initial: int, desc: str, enabled: bool, unit: str = "img"):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                disable=not enabled, dynamic_ncols=True, leave=True)


# A captioner: item -> (text, timings dict). `session_captioner` makes one from a Session.
Captioner = Callable[[Item], tuple[str, dict]]
Answerer = Callable[[Item, str], tuple[str, dict]]


def session_captioner(session, prompt: str, vhr, gen) -> Captioner:
    def caption(item: Item) -> tuple[str, dict]:
        r = session.caption(item.load(), prompt, vhr=vhr, gen=gen)
        t = asdict(r.timings)
        t["stop_reason"] = r.stop_reason
        return r.text, t

    return caption


def session_answerer(session, vhr, gen, suffix: str = "") -> Answerer:
    def answer(item: Item, question: str) -> tuple[str, dict]:
        q = f"{question} {suffix}".strip() if suffix else question
        r = session.caption(item.load(), q, vhr=vhr, gen=gen)
        return r.text, asdict(r.timings)

    return answer


def results(units: Sequence[tuple], work) -> Iterator[tuple[int, Any]]:
    """(index, result) per unit: `work(*unit)` in order, or `work.map_unordered(units)` as they finish.
    Locally, as on Ray, an image that cannot be read fails alone: a `Failed` for its unit (no
    retry: the same file fails the same way), and the run goes on."""
    many = getattr(work, "map_unordered", None)
    if many is not None:
        yield from many(units)
        return
    for i, u in enumerate(units):
        try:
            yield i, work(*u)
        except ImageError as e:
            yield i, Failed(f"ImageError: {e}", 1)


def captioner_for(session, prompt: str, vhr, gen) -> Captioner:
    """A Session's captioner, or a cluster pool's (anything with its own `captioner`)."""
    if hasattr(session, "captioner"):
        return session.captioner(prompt, vhr, gen)
    return session_captioner(session, prompt, vhr, gen)


def answerer_for(session, vhr, gen, suffix: str = "") -> Answerer:
    if hasattr(session, "answerer"):
        return session.answerer(vhr, gen, suffix)
    return session_answerer(session, vhr, gen, suffix)


def _failed_summary(store: JsonlStore, keys: Sequence[str]) -> dict:
    failed = {k: store.failed[k] for k in keys if k in store.failed}
    return {"failed": {k: {"error": r["error"], "tries": r.get("tries")} for k, r in failed.items()}} if failed else {}


def _timing_summary(recs: Sequence[dict]) -> dict:
    ts = [r.get("timings") or {} for r in recs]
    tot = [t["total_ms"] for t in ts if isinstance(t.get("total_ms"), (int, float))]
    tps = [t["tokens_per_s"] for t in ts if isinstance(t.get("tokens_per_s"), (int, float)) and t["tokens_per_s"] > 0]
    return {
        "mean_s_per_item": round(sum(tot) / len(tot) / 1000.0, 4) if tot else None,
        "mean_tokens_per_s": round(sum(tps) / len(tps), 2) if tps else None,
    }


def run_chair(source: DataSource, out_dir, captioner: Captioner, *, tag: str = "run",
              settings: Optional[dict] = None, progress: bool = True,
              on_result: Optional[Callable[[], None]] = None) -> dict:
    """Caption every item not yet done, append JSONL lines, write and return the summary
    ({"n", "chair_s", "chair_i", "recall", "mean_len"} over all items of the source; plus
    "n_failed" when some items failed on every try). on_result: called after each new line."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_ids(out, source)
    check_settings(out / f"chair-{tag}.run.json", {"task": "chair", "data": source.describe(), **(settings or {})})
    vocab = source.vocab
    with JsonlStore(out / f"chair-{tag}.jsonl", key=lambda r: str(r["image_id"])) as store:
        todo = [it for it in source.items if it.key not in store]
        bar = _progress(len(source.items), len(source.items) - len(todo), f"chair {tag}", progress)
        n_hall = n_new = 0
        try:
            for i, res in results([(it,) for it in todo], captioner):
                it = todo[i]
                if isinstance(res, Failed):
                    store.add({"image_id": it.image_id, "error": res.error, "tries": res.tries})
                else:
                    text, timings = res
                    sc = chair.score_caption(text, it.gt, vocab)
                    store.add({"image_id": it.image_id, "caption": text, "gt_objects": list(it.gt),
                               "mentioned": sc["mentioned"], "hallucinated": sc["hallucinated"],
                               "negated": sc["negated"], "timings": timings})
                    n_hall += bool(sc["hallucinated"])
                    n_new += 1
                if bar is not None:
                    bar.set_postfix_str(f"CHAIR_S {n_hall}/{n_new} new", refresh=False)
                    bar.update(1)
                if on_result is not None:
                    on_result()
        finally:
            if bar is not None:
                bar.close()
        scored = [it for it in source.items if it.key in store.done]
        recs = [store.done[it.key] for it in scored]
        failed = _failed_summary(store, [it.key for it in source.items])
    scores = chair.chair_scores(({"caption": r["caption"], "gt_objects": it.gt} for r, it in zip(recs, scored)),
                                vocab)
    summary = dict(scores.summary)
    if failed:
        summary["n_failed"] = len(failed["failed"])
    _write_json(out / f"chair-{tag}.summary.json", {
        **summary, "tag": tag, "vocabulary": vocab.name, "negation_rule": chair.NEGATION_RULE,
        "data": source.describe(), "timing": _timing_summary(recs), "settings": settings or {},
        "jsonl": f"chair-{tag}.jsonl", **failed,
    })
    return summary


def pope_questions(source: DataSource, splits: Sequence[str], seed: int, n_pos: int = pope.N_POS
                   ) -> dict[str, list[pope.PopeQuestion]]:
    stats = pope.object_stats(source.pool_gts())
    items = [(it.image_id, it.gt) for it in source.items]
    return {s: pope.build_split(items, s, source.categories, seed=seed, n_pos=n_pos, stats=stats) for s in splits}


def run_pope(source: DataSource, out_dir, answerer: Answerer, splits: Sequence[str] = pope.POPE_SPLITS, *,
             seed: int = 0, n_pos: int = pope.N_POS, tag: str = "run", settings: Optional[dict] = None,
             progress: bool = True) -> dict:
    """Answer every (image, object) question of `splits` not yet answered (an answer is shared
    by the splits that ask it), write and return {split: metrics} (+ "average" for > 1 split)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_ids(out, source)
    check_settings(out / f"pope-{tag}.run.json",
                   {"task": "pope", "data": source.describe(), "pope_seed": seed, "n_pos": n_pos, **(settings or {})})
    qs = pope_questions(source, splits, seed, n_pos)
    _write_json(out / "pope-questions.json", {s: [q.to_json() for q in v] for s, v in qs.items()})
    by_id = {it.key: it for it in source.items}

    def key(image_id, obj) -> str:
        return f"{image_id}\t{obj}"

    unique: dict[str, pope.PopeQuestion] = {}
    for s in splits:
        for q in qs[s]:
            unique.setdefault(key(q.image_id, q.object), q)
    with JsonlStore(out / f"pope-{tag}.jsonl", key=lambda r: key(r["image_id"], r["object"])) as store:
        todo = [q for k, q in unique.items() if k not in store]
        bar = _progress(len(unique), len(unique) - len(todo), f"pope {tag}", progress, unit="q")
        try:
            for i, res in results([(by_id[str(q.image_id)], q.question) for q in todo], answerer):
                q = todo[i]
                if isinstance(res, Failed):
                    store.add({"image_id": q.image_id, "object": q.object, "question": q.question,
                               "error": res.error, "tries": res.tries})
                else:
                    text, timings = res
                    store.add({"image_id": q.image_id, "object": q.object, "question": q.question,
                               "answer": text, "pred": pope.parse_yes_no(text), "timings": timings})
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        answers = {k: store.done[k]["answer"] for k in unique if k in store.done}
        failed = _failed_summary(store, list(unique))
    result: dict[str, dict] = {}
    for s in splits:
        asked = [q for q in qs[s] if key(q.image_id, q.object) in answers]
        labels = [q.label for q in asked]
        preds = [pope.parse_yes_no(answers[key(q.image_id, q.object)]) for q in asked]
        result[s] = pope.pope_metrics(labels, preds)
    if len(splits) > 1:
        result["average"] = pope.average([result[s] for s in splits])
    _write_json(out / f"pope-{tag}.summary.json", {
        **result, "tag": tag, "data": source.describe(), "pope_seed": seed, "n_pos": n_pos,
        "settings": settings or {}, "jsonl": f"pope-{tag}.jsonl", **failed,
    })
    if failed:
        result = {**result, "n_failed": len(failed["failed"])}
    return result
