"""Label Studio round trip: export records as labeling tasks, read the annotated export back, merge it.

Why: human captions and VQA answers are collected in `Label Studio <https://labelstud.io>`_; this module is
the only place that knows its JSON formats, so the annotate stage and the ``labelstudio`` ingest source
stay format-free. Field names follow Label Studio's documentation (guide/task_format, guide/predictions,
guide/storage "Local storage", tags/textarea):

* an **import task** is ``{"data": {...}, "predictions": [{"model_version", "score", "result": [...]}]}``;
  the ``data`` keys are the ``$variables`` of the labeling config;
* an **export** is a JSON list of tasks ``{"id", "data", "annotations": [{"id", "completed_by",
  "result": [{"id", "from_name", "to_name", "type", "value", "origin"}], "was_cancelled", "ground_truth",
  "parent_prediction", ...}], "predictions": [...]}``; ``completed_by`` is a user id (an int) or, in
  some exports, an object ``{"id", "email", ...}``; a result's ``origin`` is ``manual``, ``prediction``
  (accepted unchanged) or ``prediction-changed``;
* a TextArea result is ``{"type": "textarea", "value": {"text": [row, ...]}}`` (one entry per submitted
  row), a Choices result ``{"type": "choices", "value": {"choices": [...]}}``.

Labeling scheme (:data:`LABEL_CONFIG`, paste it into the project's Labeling Interface > Code):
one task per image. ``data.image`` is shown by the Image tag "image". Annotators write captions in the
TextArea "caption", one caption per row or per line (several allowed). The image's VQA questions are kept
in the task as ``data.questions`` (a list, for joining back) and shown numbered as ``data.questions_text``;
annotators answer in the TextArea "answers", **one answer per line, in question order** (``-`` or ``?``
for "cannot tell"; blank lines are ignored; a line may carry its number, ``2. red``). One TextArea for all
questions keeps the config static whatever the number of questions (a per-question control would need
Repeater/dynamic configs that differ between Label Studio versions). The Choices "flags" lets an annotator
mark an image (unusable, caption wrong, sensitive); flags are recorded in meta, nothing is dropped here.
``data.sample_id`` is our id, used to join the export back to the dataset (fallback: the sha256 of a
data-URI image).

Agreement (recorded in ``meta["annotations"]``, summarised in the stats):

* captions: mean over annotator pairs of a symmetric best-match token F1 (the SQuAD answer F1 of
  Rajpurkar et al., 2016, on lower-cased word tokens) between the two annotators' caption sets. Token F1
  rather than BLEU-1 because it is symmetric and needs no brevity penalty; it is a coarse signal (two
  correct captions of one image often share few words), so it flags nothing by default;
* VQA answers: answers are normalised like the VQA evaluation (Antol et al., 2015: lower case, punctuation
  and articles removed, number words to digits), the consensus is the majority vote (an annotation marked
  ``ground_truth`` decides instead), and agreement = share of annotators who gave the consensus. A
  question with agreement < ``min_agreement`` or a tie goes to the review list and its answer is not
  changed. Over all questions with >= 2 answers we report Fleiss' kappa (Fleiss, 1971; the usual
  generalisation to a varying number of raters per item) and Krippendorff's alpha for nominal data
  (Krippendorff, 2011, which handles missing ratings exactly).

Nothing is lost: cancelled annotations are counted, tasks that cannot be joined or parsed become review
items (merge) or quarantine rows (ingest) with a specific reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import logging
import math
import os
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote, urlsplit

from mmplatform.data.dataset import make_record
from mmplatform.data.images import BadImage, decode_image, encode_png, sniff_format
from mmplatform.data.ingest import _Loader, _quarantine, _Reject

log = logging.getLogger(__name__)

CAPTION_TAG = "caption"
ANSWERS_TAG = "answers"
FLAGS_TAG = "flags"
IMAGE_TAG = "image"

# Paste into Label Studio (Settings > Labeling Interface > Code). The $variables are the data keys that
# export_tasks writes. Text tags need pre-wrap to show one caption / question per line.
LABEL_CONFIG = """\
<View>
  <Style>.lsf-richtext, .htx-text { white-space: pre-wrap; }</Style>
  <Image name="image" value="$image" maxWidth="640px"/>
  <Header value="Captions already in the dataset (do not repeat them)" size="6"/>
  <Text name="existing_captions" value="$captions_text"/>
  <Header value="Describe the image: one caption per line, what is visible, one sentence each" size="5"/>
  <TextArea name="caption" toName="image" rows="3" editable="true" maxSubmissions="10"
            placeholder="a caption per line"/>
  <Header value="Answer each question on its own line, in order (write - if you cannot tell)" size="5"/>
  <Text name="questions_view" value="$questions_text"/>
  <TextArea name="answers" toName="image" rows="4" editable="true" maxSubmissions="1"
            placeholder="one answer per line, in question order"/>
  <Choices name="flags" toName="image" choice="multiple" showInline="true">
    <Choice value="unusable image"/>
    <Choice value="existing caption wrong"/>
    <Choice value="sensitive content"/>
  </Choices>
</View>
"""

ImageMode = Literal["data-uri", "local-files"]
LOCAL_FILES_PREFIX = "/data/local-files/"
_REMOTE_SCHEMES = ("http", "https", "s3", "gs", "gcs", "azure-blob", "ftp")
_NO_ANSWER = {"", "-", "?", "n/a", "na"}
_NUMBERED = re.compile(r"^\s*(\d{1,3})\s*[.):]\s+(.*)$")
_PRED_BATCH = 64


# ------------------------------------------------------------------------------------------- export

def _image_ext(data: bytes) -> str:
    fmt = sniff_format(data)
    return {"JPEG": "jpg", None: "bin"}.get(fmt, (fmt or "bin").lower())


def data_uri(data: bytes) -> str:
    """``data:image/<fmt>;base64,...`` for encoded image bytes (self-contained task files)."""
    fmt = sniff_format(data) or "PNG"
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(data).decode('ascii')}"


def export_tasks(
    records: Iterable[dict[str, Any]],
    out_file: str | Path,
    *,
    image_root: str | Path | None = None,
    image_mode: ImageMode = "data-uri",
    predict_captions: Callable[[list[bytes]], Sequence[str | tuple[str, float]]] | None = None,
    model_version: str = "",
    document_root: str | Path | None = None,
) -> int:
    """Write ``records`` as a JSON list of Label Studio import tasks for :data:`LABEL_CONFIG`.

    ``image_mode="data-uri"`` (default) embeds each image, so the file alone is enough to import.
    ``"local-files"`` writes ``<image_root>/<sample_id>.<ext>`` (default ``image_root``: ``images/`` beside
    ``out_file``) and references it as ``/data/local-files/?d=<path relative to document_root>``
    (default ``document_root``: the folder of ``out_file``), which is what Label Studio serves when
    ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` is
    that folder.

    With ``predict_captions`` (image bytes -> one caption, or ``(caption, score)``, per image), each task
    gets a ``predictions`` entry: model-assisted pre-annotation shown to the annotator for correction.
    When the callable gives no score, ``score`` is the best token F1 of the prediction against the image's
    existing captions (0 without any), so Label Studio's Data Manager can sort the images where the model
    and the dataset disagree first. Returns the number of tasks written.
    """
    out_file = Path(out_file)
    if image_mode not in ("data-uri", "local-files"):
        raise ValueError(f"image_mode {image_mode!r}: expected 'data-uri' or 'local-files'")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    doc_root = img_root = None
    if image_mode == "local-files":
        doc_root = Path(document_root) if document_root is not None else out_file.parent
        img_root = Path(image_root) if image_root is not None else out_file.parent / "images"
        img_root.mkdir(parents=True, exist_ok=True)
        if not img_root.resolve().is_relative_to(doc_root.resolve()):
            raise ValueError(f"image_root {img_root} is not inside document_root {doc_root}: "
                             "Label Studio could not serve the images")
    records = list(records)
    tasks: list[dict[str, Any]] = []
    for rec in records:
        image = bytes(rec["image"])
        sid = rec.get("sample_id") or hashlib.sha256(image).hexdigest()[:20]
        if image_mode == "data-uri":
            ref = data_uri(image)
        else:
            target = img_root / f"{sid}.{_image_ext(image)}"
            if not (target.is_file() and target.stat().st_size == len(image)):
                target.write_bytes(image)
            rel = target.resolve().relative_to(doc_root.resolve()).as_posix()
            ref = f"{LOCAL_FILES_PREFIX}?d={quote(rel, safe='/')}"
        captions = [str(c) for c in rec.get("captions") or []]
        questions = [str(q) for q in rec.get("questions") or []]
        data = {
            "image": ref,
            "sample_id": sid,
            "captions": captions,
            "captions_text": "\n".join(captions) or "(none yet)",
            "questions": questions,
            "questions_text": "\n".join(f"{i}. {q}" for i, q in enumerate(questions, 1)) or "(no questions)",
            "answers": [str(a) for a in rec.get("answers") or []],
        }
        tasks.append({"data": data})
    if predict_captions is not None:
        _add_predictions(tasks, records, predict_captions, model_version)
    tmp = out_file.with_name(out_file.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(tasks, f, ensure_ascii=False, indent=1)
    os.replace(tmp, out_file)
    log.info("exported %d Label Studio tasks to %s (%s)", len(tasks), out_file, image_mode)
    return len(tasks)


def _add_predictions(tasks: list[dict], records: list[dict], predict: Callable, model_version: str) -> None:
    for start in range(0, len(records), _PRED_BATCH):
        batch = records[start:start + _PRED_BATCH]
        preds = list(predict([bytes(r["image"]) for r in batch]))
        if len(preds) != len(batch):
            raise ValueError(f"predict_captions returned {len(preds)} captions for {len(batch)} images")
        for task, rec, pred in zip(tasks[start:start + _PRED_BATCH], batch, preds, strict=True):
            text, score = (pred if isinstance(pred, tuple) else (pred, None))
            text = str(text).strip()
            if score is None:
                score = max((token_f1(text, c) for c in rec.get("captions") or []), default=0.0)
            score = float(score) if math.isfinite(float(score)) else 0.0
            task["predictions"] = [{
                "model_version": model_version,
                "score": round(float(score), 6),
                "result": [{
                    "id": f"pred-{task['data']['sample_id'][:12]}",
                    "from_name": CAPTION_TAG, "to_name": IMAGE_TAG, "type": "textarea",
                    "value": {"text": [text]},
                }],
            }]


# ------------------------------------------------------------------------------------ export parsing

@dataclass
class Annotation:
    """One submitted (not cancelled) annotation of one task."""

    annotation_id: str
    annotator: str
    captions: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # by question position; "" = no answer
    flags: list[str] = field(default_factory=list)
    ground_truth: bool = False
    from_prediction: bool = False  # a prediction was accepted (parent_prediction / origin "prediction")

    def sort_key(self) -> tuple:
        return _id_key(self.annotation_id)


@dataclass
class TaskAnnotations:
    """What one task of a Label Studio export holds, already validated."""

    export: str
    index: int  # position in the export's list
    task_id: Any = None
    sample_id: str = ""
    image: str = ""  # data.image as exported
    captions: list[str] = field(default_factory=list)  # data.captions (what the dataset had)
    questions: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # data.answers (what the dataset had)
    annotations: list[Annotation] = field(default_factory=list)
    cancelled: int = 0
    cancelled_ids: list[tuple[str, str]] = field(default_factory=list)  # (annotator, annotation id)
    predicted_captions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # snake_case reasons, for review
    valid: bool = True  # False: the task itself is unusable (not an object, no data)

    @property
    def where(self) -> str:
        return f"{self.export}: task index {self.index}"


def _id_key(v: Any) -> tuple:
    s = str(v)
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


def _load_tasks(path: Path) -> list[Any]:
    """The export's top-level list, parsed element by element so that a syntax error names the task."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or type(e).__name__}") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 (byte {e.start})") from e
    dec = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end()
    if text.startswith("{", pos):  # a single task object
        try:
            obj, end = dec.raw_decode(text, pos)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}: not valid JSON: {_json_msg(e)}") from e
        if text[ws.match(text, end).end():]:
            raise ValueError(f"{path}: extra data after the task object")
        return [obj]
    if not text.startswith("[", pos):
        raise ValueError(f"{path}: not a Label Studio JSON export (expected a list of tasks)")
    tasks: list[Any] = []
    pos = ws.match(text, pos + 1).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                obj, pos = dec.raw_decode(text, pos)
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{path}: task index {len(tasks)}: invalid JSON: {_json_msg(e)}") from e
            tasks.append(obj)
            pos = ws.match(text, pos).end()
            if text.startswith(",", pos):
                pos = ws.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                line = text.count("\n", 0, pos) + 1
                raise ValueError(f"{path}: task index {len(tasks) - 1}: invalid JSON: expected ',' or ']' "
                                 f"at line {line}")
    if text[ws.match(text, pos).end():]:
        raise ValueError(f"{path}: extra data after the list of tasks")
    return tasks


def _json_msg(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at line {e.lineno} column {e.colno}"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _clean_str(s: str) -> str:
    # JSON allows lone surrogates ("\ud800"); they cannot be stored as UTF-8 (the Parquet writer fails).
    return "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in s).strip()


def _str_list(v: Any) -> list[str] | None:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return list(v)
    return None


def _annotator(ann: dict[str, Any]) -> str:
    by = ann.get("completed_by")
    if isinstance(by, dict):  # some exports expand the user: {"id", "email", "first_name", ...}
        by = by.get("email") or by.get("id")
    if by is None or isinstance(by, bool) or not isinstance(by, str | int):
        return f"unknown:{ann.get('id')}"
    return str(by)


def import_export(export_file: str | Path) -> list[TaskAnnotations]:
    """Parse a Label Studio JSON export (a list of tasks, or one task object).

    A file that is not a readable JSON list raises a one-line ``ValueError`` naming the file (and the
    task index where the JSON breaks). Problems inside a task (no data, a malformed annotation or result,
    text that is not a string, more answers than questions) do not raise: they are listed in
    ``TaskAnnotations.problems`` for review, and whatever is sound in the task is kept. Cancelled
    (``was_cancelled``) annotations are counted and skipped.
    """
    path = Path(export_file)
    out: list[TaskAnnotations] = []
    for i, task in enumerate(_load_tasks(path)):
        t = TaskAnnotations(export=str(path), index=i)
        out.append(t)
        if not isinstance(task, dict):
            t.valid = False
            t.problems.append("bad_task: not an object")
            continue
        t.task_id = task.get("id")
        data = task.get("data")
        if not isinstance(data, dict):
            t.valid = False
            t.problems.append("missing_field: data" if data is None else "bad_field: data")
            continue
        sid = data.get("sample_id")
        if isinstance(sid, str | int) and not isinstance(sid, bool) and str(sid):
            t.sample_id = str(sid)
        elif sid is not None:
            t.problems.append("bad_field: sample_id")
        img = data.get("image")
        if isinstance(img, str):
            t.image = img
        for key in ("captions", "questions", "answers"):
            vals = _str_list(data.get(key))
            if vals is None:
                t.problems.append(f"bad_field: data.{key}")
                vals = []
            setattr(t, key, [c for c in (_clean_str(v) for v in vals) if c] if key == "captions"
                    else [_clean_str(v) for v in vals])
        anns = task.get("annotations") or []
        if not isinstance(anns, list):
            t.problems.append("bad_field: annotations")
            anns = []
        for j, ann in enumerate(anns):
            if not isinstance(ann, dict):
                t.problems.append(f"bad_annotation: {j}: not an object")
                continue
            if ann.get("was_cancelled") is True:
                t.cancelled += 1
                t.cancelled_ids.append((_annotator(ann), str(ann.get("id", f"#{j}"))))
                continue
            a = _parse_annotation(ann, j, len(t.questions), t.problems)
            if a is not None:
                t.annotations.append(a)
        preds = task.get("predictions") or []
        for p in preds if isinstance(preds, list) else []:
            if isinstance(p, dict) and isinstance(p.get("result"), list):
                for r in p["result"]:
                    txt = _textarea(r, CAPTION_TAG)
                    t.predicted_captions.extend(_clean_str(x) for x in txt or [] if isinstance(x, str))
    log.info("%s: %d tasks, %d annotations, %d cancelled", path, len(out),
             sum(len(t.annotations) for t in out), sum(t.cancelled for t in out))
    return out


def _textarea(r: Any, name: str) -> list | None:
    if not isinstance(r, dict) or r.get("from_name") != name or not isinstance(r.get("value"), dict):
        return None
    text = r["value"].get("text")
    return [text] if isinstance(text, str) else text if isinstance(text, list) else None


def _parse_annotation(ann: dict, j: int, n_questions: int, problems: list[str]) -> Annotation | None:
    aid = ann.get("id", f"#{j}")
    a = Annotation(annotation_id=str(aid), annotator=_annotator(ann), ground_truth=ann.get("ground_truth") is True,
                   from_prediction=ann.get("parent_prediction") not in (None, ""))
    result = ann.get("result")
    if result is None:
        result = []
    if not isinstance(result, list):
        problems.append(f"bad_annotation: {aid}: result is not a list")
        return a
    answer_lines: list[str] = []
    for r in result:
        if not isinstance(r, dict):
            problems.append(f"bad_result: {aid}: not an object")
            continue
        if r.get("origin") == "prediction":
            a.from_prediction = True
        name, value = r.get("from_name"), r.get("value")
        if name in (CAPTION_TAG, ANSWERS_TAG):
            rows = _textarea(r, name)
            if rows is None or not all(isinstance(x, str) for x in rows):
                problems.append(f"bad_result: {aid}: {name}: value.text is not a list of strings")
                continue
            lines = [_clean_str(line) for row in rows for line in row.splitlines()]
            lines = [line for line in lines if line]
            if name == CAPTION_TAG:
                for c in lines:
                    if c not in a.captions:
                        a.captions.append(c)
            else:
                answer_lines.extend(lines)
        elif name == FLAGS_TAG and isinstance(value, dict):
            ch = value.get("choices")
            if isinstance(ch, list):
                a.flags.extend(_clean_str(c) for c in ch if isinstance(c, str))
    if answer_lines:
        a.answers = _align_answers(answer_lines, n_questions, aid, problems)
    return a


def _align_answers(lines: list[str], n: int, aid: Any, problems: list[str]) -> list[str]:
    """Answer lines -> answers by question position. Lines all numbered ("2. red") go by their number;
    otherwise by order, a leading number being dropped when it is the line's own position."""
    matches = [_NUMBERED.match(line) for line in lines]
    answers = [""] * n
    if all(matches) and len({int(m.group(1)) for m in matches}) == len(matches):
        for m in matches:
            k = int(m.group(1)) - 1
            if 0 <= k < n:
                answers[k] = m.group(2).strip()
            else:
                problems.append(f"extra_answers: {aid}: answer numbered {k + 1}, {n} questions")
    else:
        for k, (line, m) in enumerate(zip(lines, matches, strict=True)):
            if m and int(m.group(1)) == k + 1:
                line = m.group(2).strip()
            if k < n:
                answers[k] = line
        if len(lines) > n:
            problems.append(f"extra_answers: {aid}: {len(lines)} answer lines, {n} questions")
    return ["" if x.lower() in _NO_ANSWER else x for x in answers]


# ---------------------------------------------------------------------------------------- agreement

_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_PUNCT = re.compile("[" + re.escape("".join(c for c in string.punctuation if c not in ".'")) + "]")


def normalize_answer(ans: str) -> str:
    """VQA-style answer normalisation (after Antol et al., 2015, simplified): lower case, ``1,000`` ->
    ``1000``, apostrophes dropped, other punctuation to spaces, a period kept only inside a number,
    number words zero..ten to digits, articles removed, whitespace collapsed."""
    s = ans.lower().strip()
    s = re.sub(r"(?<=\d),(?=\d)", "", s)
    s = s.replace("'", "").replace("\u2019", "")
    s = _PUNCT.sub(" ", s)
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", s)
    words = [_NUMBER_WORDS.get(w, w) for w in s.split() if w not in _ARTICLES]
    return " ".join(words)


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def token_f1(a: str, b: str) -> float:
    """Bag-of-words F1 between two texts (SQuAD answer F1 on lower-cased word tokens)."""
    ta, tb = _tokens(a), _tokens(b)
    if not ta or not tb:
        return float(ta == tb)
    common = sum((Counter(ta) & Counter(tb)).values())
    if common == 0:
        return 0.0
    p, r = common / len(ta), common / len(tb)
    return 2 * p * r / (p + r)


def caption_set_similarity(xs: Sequence[str], ys: Sequence[str]) -> float:
    """Symmetric best-match token F1 between two annotators' captions: each caption is matched with its
    best counterpart on the other side, and the two directions are averaged."""
    if not xs or not ys:
        return 0.0
    fwd = sum(max(token_f1(x, y) for y in ys) for x in xs) / len(xs)
    bwd = sum(max(token_f1(y, x) for x in xs) for y in ys) / len(ys)
    return (fwd + bwd) / 2


def fleiss_kappa(items: Sequence[Sequence[str]]) -> float | None:
    """Fleiss' kappa over items, each a list of the category labels its raters gave. Items with fewer
    than 2 ratings are skipped; with a varying number of raters, P_i uses each item's own n_i (the usual
    generalisation). None when undefined (no item, or a single category overall)."""
    rated = [Counter(it) for it in items if len(it) >= 2]
    if not rated:
        return None
    p_items = []
    totals: Counter = Counter()
    n_all = 0
    for c in rated:
        n = sum(c.values())
        p_items.append((sum(v * v for v in c.values()) - n) / (n * (n - 1)))
        totals.update(c)
        n_all += n
    p_bar = sum(p_items) / len(p_items)
    p_e = sum((v / n_all) ** 2 for v in totals.values())
    if math.isclose(p_e, 1.0):
        return None
    return (p_bar - p_e) / (1 - p_e)


def krippendorff_alpha_nominal(units: Sequence[Sequence[str]]) -> float | None:
    """Krippendorff's alpha for nominal data; each unit lists the values its coders gave (missing ones
    simply absent). Coincidence-matrix form (Krippendorff, 2011): alpha = 1 - D_o / D_e with
    D_o = sum_{c!=k} o_ck / n and D_e = sum_{c!=k} n_c n_k / (n (n - 1)). None when undefined."""
    o: Counter = Counter()
    for vals in units:
        m = len(vals)
        if m < 2:
            continue
        cnt = Counter(vals)
        for c, k in itertools.product(cnt, cnt):
            pairs = cnt[c] * (cnt[k] - (c == k))
            if pairs:
                o[(c, k)] += pairs / (m - 1)
    n_c: Counter = Counter()
    for (c, _k), v in o.items():
        n_c[c] += v
    n = sum(n_c.values())
    if n <= 1:
        return None
    d_o = sum(v for (c, k), v in o.items() if c != k) / n
    d_e = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k) / (n * (n - 1))
    if d_e == 0:
        return None
    return 1 - d_o / d_e


# ------------------------------------------------------------------------------------------ merging

@dataclass
class _Merged:
    captions: list[str]
    questions: list[str]
    answers: list[str]
    meta: dict[str, Any]
    review: list[dict[str, Any]]
    captions_added: int = 0
    answers_merged: int = 0
    votes: list[list[str]] = field(default_factory=list)  # normalised votes per question, for kappa/alpha
    agreements: list[float] = field(default_factory=list)


def _dedup_key(text: str) -> str:
    return " ".join(text.casefold().split())


def _merge_sample(sample_id: str, captions: list[str], questions: list[str], answers: list[str],
                  tasks: list[TaskAnnotations], min_agreement: float) -> _Merged:
    """Merge every annotation of one image (possibly from several tasks/exports) into its fields."""
    # One annotation counted once even if two exports of the same project both hold it.
    seen: dict[tuple, Annotation] = {}
    for t in tasks:
        for a in t.annotations:
            seen[(a.annotator, a.annotation_id)] = a
    anns = sorted(seen.values(), key=Annotation.sort_key)
    out_caps = list(captions)
    keys = {_dedup_key(c) for c in out_caps}
    added = 0
    per_annotator: dict[str, list[str]] = {}
    for a in anns:
        for c in a.captions:
            per_annotator.setdefault(a.annotator, [])
            if c not in per_annotator[a.annotator]:
                per_annotator[a.annotator].append(c)
            if _dedup_key(c) not in keys:
                keys.add(_dedup_key(c))
                out_caps.append(c)
                added += 1
    cap_annotators = [k for k, v in per_annotator.items() if v]
    pairs = list(itertools.combinations(cap_annotators, 2))
    cap_agreement = (sum(caption_set_similarity(per_annotator[x], per_annotator[y]) for x, y in pairs)
                     / len(pairs)) if pairs else None

    # VQA: one vote per annotator and question (their latest annotation wins).
    task_questions: list[str] = []
    for t in tasks:
        for q in t.questions:
            if q and q not in task_questions:
                task_questions.append(q)
    out_q, out_a = list(questions), list(answers)
    merged = _Merged(out_caps, out_q, out_a, {}, [], captions_added=added)
    answer_info: dict[str, Any] = {}
    replaced: dict[str, str] = {}
    for q in task_questions:
        votes: dict[str, str] = {}
        gt: str | None = None
        for t in tasks:
            if q not in t.questions:
                continue
            pos = t.questions.index(q)
            for a in sorted(t.annotations, key=Annotation.sort_key):
                if pos < len(a.answers) and a.answers[pos]:
                    votes[a.annotator] = a.answers[pos]
                    if a.ground_truth:
                        gt = a.answers[pos]
        if not votes:
            continue
        norm = {who: normalize_answer(v) for who, v in votes.items()}
        merged.votes.append(list(norm.values()))
        counts = Counter(norm.values()).most_common()
        tie = gt is None and len(counts) > 1 and counts[0][1] == counts[1][1]
        winner = normalize_answer(gt) if gt is not None else counts[0][0]
        agreement = sum(v == winner for v in norm.values()) / len(norm)
        merged.agreements.append(agreement)
        # The answer stored is the raw form most annotators typed for the winning normalised answer
        # (ties: the form already in normal form, "1" rather than "one"; then the earliest).
        raw_counts = Counter(v for who, v in votes.items() if norm[who] == winner)
        raw_answer = max(raw_counts, key=lambda v: (raw_counts[v], v == winner), default=gt or winner)
        info = {"answers": dict(votes), "consensus": raw_answer, "agreement": round(agreement, 4),
                "ground_truth": gt is not None}
        reason = None
        if tie:
            reason = "tie: " + " | ".join(c for c, n in counts if n == counts[0][1])
        elif gt is None and agreement < min_agreement:
            reason = f"low_agreement: {agreement:.2f} < {min_agreement}"
        if reason:
            info["unresolved"] = reason
            merged.review.append({"sample_id": sample_id, "question": q, "answers": dict(votes),
                                  "reason": reason, **_where(tasks)})
        else:
            if q in out_q:
                k = out_q.index(q)
                if k < len(out_a) and out_a[k] and normalize_answer(out_a[k]) != winner:
                    replaced[q] = out_a[k]
                while len(out_a) <= k:
                    out_a.append("")
                out_a[k] = raw_answer
            else:
                out_q.append(q)
                out_a.append(raw_answer)
            merged.answers_merged += 1
        answer_info[q] = info
    flags = Counter(f for a in anns for f in a.flags)
    meta: dict[str, Any] = {
        "annotators": sorted({a.annotator for a in anns}, key=_id_key),
        "annotations": len(anns),
        "cancelled": len({c for t in tasks for c in t.cancelled_ids}),
        "captions_added": added,
        "caption_agreement": None if cap_agreement is None else round(cap_agreement, 4),
        "accepted_predictions": sum(a.from_prediction for a in anns),
        "ground_truth": any(a.ground_truth for a in anns),
        "exports": sorted({t.export for t in tasks}),
    }
    if answer_info:
        meta["answers"] = answer_info
    if replaced:
        meta["replaced_answers"] = replaced
    if flags:
        meta["flags"] = dict(sorted(flags.items()))
    problems = [p for t in tasks for p in t.problems]
    if problems:
        meta["problems"] = problems
        merged.review.extend({"sample_id": sample_id, "question": None, "answers": {}, "reason": p,
                              **_where(tasks)} for p in problems)
    merged.meta = meta
    return merged


def _where(tasks: list[TaskAnnotations]) -> dict[str, Any]:
    t = tasks[0]
    return {"export": t.export, "task_index": t.index, "task_id": t.task_id}


def _decode_data_uri(ref: str, max_bytes: int) -> bytes:
    """Bytes of a ``data:[<type>][;base64],<payload>`` URI; raises _Reject. The payload length is
    checked against ``max_bytes`` before anything is decoded."""
    head, sep, payload = ref.partition(",")
    if not sep:
        raise _Reject("bad_data_uri: no comma")
    if not head.lower().endswith(";base64"):
        raise _Reject("bad_data_uri: not base64")
    limit = 4 * math.ceil(max_bytes / 3)
    if len(payload) > 2 * limit + 1024:  # cheap bound before stripping line breaks
        raise _Reject(f"too_large: data URI over {max_bytes} bytes")
    payload = "".join(payload.split())
    if len(payload) > limit:
        raise _Reject(f"too_large: data URI over {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _Reject("bad_data_uri: invalid base64") from e


def _data_uri_sha256(ref: str, max_bytes: int = 20_000_000) -> str | None:
    if not ref.startswith("data:"):
        return None
    try:
        return hashlib.sha256(_decode_data_uri(ref, max_bytes)).hexdigest()
    except _Reject:
        return None


def merge_annotations(
    records: list[dict[str, Any]],
    exports: Sequence[str | Path],
    *,
    min_agreement: float = 0.5,
) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """Merge Label Studio exports into ``records``; returns ``(records, stats, review_items)``.

    Tasks are joined by ``data.sample_id`` (fallback: sha256 of a data-URI image). Each matched record
    gets every annotator's captions appended after its own (deduplicated case- and space-insensitively;
    order: existing, then by annotation id), its VQA answers replaced by the consensus where the vote is
    clear, and ``meta["annotations"]`` (annotators, counts, caption agreement, per-question votes and
    agreement, answers it replaced). Review items (dicts with sample_id, question, answers by annotator,
    reason, export, task_index, task_id) list ties, low agreement, tasks whose sample is not in
    ``records`` (``unknown_sample``) and tasks that could not be read; no task is dropped unreported.
    Every input record is returned, in order (records without annotations unchanged).
    """
    by_id = {r["sample_id"]: i for i, r in enumerate(records)}
    by_sha = {r.get("image_sha256"): i for i, r in enumerate(records) if r.get("image_sha256")}
    groups: dict[int, list[TaskAnnotations]] = {}
    review: list[dict[str, Any]] = []
    n_tasks = n_ann = n_cancel = n_unknown = 0
    for export in exports:
        for t in import_export(export):
            n_tasks += 1
            n_ann += len(t.annotations)
            n_cancel += t.cancelled
            where = {"export": t.export, "task_index": t.index, "task_id": t.task_id}
            if not t.valid:
                review.extend({"sample_id": "", "question": None, "answers": {}, "reason": p, **where}
                              for p in t.problems)
                continue
            idx = by_id.get(t.sample_id)
            if idx is None:
                idx = by_sha.get(_data_uri_sha256(t.image))
            if idx is None:
                n_unknown += 1
                review.append({"sample_id": t.sample_id, "question": None,
                               "answers": _task_answers(t), "reason": "unknown_sample", **where})
                continue
            groups.setdefault(idx, []).append(t)
    out = list(records)
    captions_added = answers_merged = 0
    votes: list[list[str]] = []
    agreements: list[float] = []
    cap_agreements: list[float] = []
    for idx, tasks in sorted(groups.items()):
        rec = dict(records[idx])
        m = _merge_sample(rec["sample_id"], list(rec.get("captions") or []), list(rec.get("questions") or []),
                          list(rec.get("answers") or []), tasks, min_agreement)
        meta = _meta_dict(rec.get("meta"))
        meta["annotations"] = m.meta
        rec.update(captions=m.captions, questions=m.questions, answers=m.answers,
                   meta=json.dumps(meta, sort_keys=True))
        out[idx] = rec
        review.extend(m.review)
        captions_added += m.captions_added
        answers_merged += m.answers_merged
        votes.extend(m.votes)
        agreements.extend(m.agreements)
        if m.meta["caption_agreement"] is not None:
            cap_agreements.append(m.meta["caption_agreement"])
    stats = {
        "exports": len(exports), "tasks": n_tasks, "annotations": n_ann, "cancelled": n_cancel,
        "records_annotated": len(groups), "unknown_samples": n_unknown,
        "captions_added": captions_added, "answers_merged": answers_merged,
        "questions_voted": len(agreements),
        "flagged": sum(r["reason"].startswith(("tie", "low_agreement")) for r in review),
        "review_items": len(review),
        "answer_agreement_mean": _mean(agreements), "caption_agreement_mean": _mean(cap_agreements),
        "kappa": _round(fleiss_kappa(votes)), "krippendorff_alpha": _round(krippendorff_alpha_nominal(votes)),
    }
    log.info("merged %d Label Studio tasks into %d records: %d captions added, %d answers, %d review items",
             n_tasks, len(groups), captions_added, answers_merged, len(review))
    return out, stats, review


def _task_answers(t: TaskAnnotations) -> dict[str, list[str]]:
    return {a.annotator: a.answers for a in t.annotations if a.answers}


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 6) if xs else None


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def _meta_dict(meta: Any) -> dict[str, Any]:
    if isinstance(meta, dict):
        return dict(meta)
    try:
        m = json.loads(meta or "{}")
    except (TypeError, ValueError):
        return {"meta_unparsed": str(meta)}
    return m if isinstance(m, dict) else {"meta_unparsed": m}


def review_jsonl(review_items: Iterable[dict[str, Any]]) -> str:
    """Review items as JSON lines."""
    return "".join(json.dumps(item, ensure_ascii=False, sort_keys=True, default=str) + "\n"
                   for item in review_items)


def write_review(review_items: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write review items as JSON lines; returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = review_jsonl(review_items)
    path.write_text(text, encoding="utf-8")
    return text.count("\n")


# ------------------------------------------------------------------------------------------ ingest

def ingest_labelstudio(
    path: str | Path,
    images: str | Path | None = None,
    *,
    max_image_bytes: int = 20_000_000,
    max_pixels: int = 50_000_000,
    min_agreement: float = 0.5,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A Label Studio JSON export as an ingest source: one record per task, ``(kept, quarantined)``.

    ``data.image`` may be a data URI (base64, size-checked before decoding), ``/data/local-files/?d=<rel>``
    or a plain relative path (read under ``images``, default the export's folder, with the path checks
    of the manifest ingest: no ``..``, no absolute paths, no symlinks out), or ``/data/upload/<n>/<file>``
    (the file name is looked up in ``images``, ``images/<n>/`` and ``images/upload/<n>/``). Remote URLs
    (http, s3, gs, ...) are not fetched: quarantined as ``remote_image: not fetched``. Captions are the
    task's ``data.captions`` plus every annotator's; questions/answers come from ``data.questions`` with
    the consensus answer (or ``data.answers`` where the vote is unresolved; a question with neither is
    kept only in meta). ``meta["annotations"]`` as in :func:`merge_annotations`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Label Studio export not found: {path}")
    root = Path(images) if images is not None else path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"images root is not a directory: {root}")
    loader = _Loader(root, max_image_bytes=max_image_bytes, max_pixels=max_pixels)
    kept: list[dict[str, Any]] = []
    quarantined: list[dict[str, Any]] = []
    tasks = import_export(path)
    for t in tasks:
        source = f"labelstudio:{path}:{t.index}"
        partial: dict[str, Any] = {"captions": list(t.captions), "questions": [], "answers": [],
                                   "meta": {"labelstudio": {"task_id": t.task_id, "task_index": t.index}}}
        try:
            if not t.valid:
                raise _Reject(t.problems[0])
            m = _merge_sample(t.sample_id, list(t.captions), [], [], [t], min_agreement)
            partial["captions"] = m.captions
            q, a = _questions_answers(t, m)
            partial["questions"], partial["answers"] = q, a
            partial["meta"]["annotations"] = m.meta
            if t.sample_id:
                partial["meta"]["labelstudio"]["sample_id"] = t.sample_id
            data, file_ref = _task_image(t.image, loader, max_image_bytes)
            if file_ref:
                partial["file"] = file_ref
            partial["image"] = data
            kept.append(_record(data, partial, source, max_image_bytes, max_pixels))
        except _Reject as r:
            quarantined.append(_quarantine(partial, source, r.reason, path, t.index))
    assert len(kept) + len(quarantined) == len(tasks), "labelstudio ingest lost tasks"
    log.info("ingested %s: %d kept, %d quarantined", path, len(kept), len(quarantined))
    return kept, quarantined


def _questions_answers(t: TaskAnnotations, m: _Merged) -> tuple[list[str], list[str]]:
    """Aligned questions/answers: consensus, else the answer the task data carried."""
    qs, ans, unanswered = [], [], []
    consensus = dict(zip(m.questions, m.answers, strict=True))
    for i, q in enumerate(t.questions):
        a = consensus.get(q) or (t.answers[i] if i < len(t.answers) else "")
        if q and a:
            qs.append(q)
            ans.append(a)
        elif q:
            unanswered.append(q)
    if unanswered:
        m.meta["unanswered_questions"] = unanswered
    return qs, ans


def _task_image(ref: str, loader: _Loader, max_bytes: int) -> tuple[bytes, str | None]:
    """Bytes of the task's image and the file path read (None for a data URI); raises _Reject."""
    if not ref:
        raise _Reject("missing_field: image")
    if "\x00" in ref:
        raise _Reject("bad_field: image")
    if ref[:5].lower() == "data:":
        return _decode_data_uri(ref, max_bytes), None
    parts = urlsplit(ref)
    scheme = parts.scheme.lower()
    if parts.path == LOCAL_FILES_PREFIX or parts.path == LOCAL_FILES_PREFIX.rstrip("/"):
        d = parse_qs(parts.query).get("d")
        if not d or not d[0]:
            raise _Reject("bad_field: image: local-files URL without d=")
        return loader._read(d[0]), d[0]
    if scheme in _REMOTE_SCHEMES:
        raise _Reject("remote_image: not fetched")
    if scheme and len(scheme) > 1:  # file:, ftp:, ... (one letter is a Windows drive, left to the loader)
        raise _Reject(f"unsupported_image_ref: {scheme}")
    upload = re.match(r"^/data/upload/(\d+)/([^/]+)$", parts.path)
    if upload:
        project, name = upload.groups()
        if name in (".", ".."):
            raise _Reject("path_outside_root")
        # Label Studio stores uploads as "<8 hex>-<original name>"; the user's folder has the original name.
        names = [name] + ([name[9:]] if re.match(r"^[0-9a-f]{8}-.", name) else [])
        for rel in [r for n in names for r in (n, f"{project}/{n}", f"upload/{project}/{n}")]:
            try:
                return loader._read(rel), rel
            except _Reject as r:
                if r.reason != "missing_file":
                    raise
        raise _Reject("missing_file")
    return loader._read(ref), ref


def _record(data: bytes, fields: dict[str, Any], source: str, max_bytes: int, max_pixels: int) -> dict[str, Any]:
    try:
        im = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    except BadImage as e:
        raise _Reject(e.reason) from e
    meta = dict(fields["meta"])
    if fields.get("file"):
        meta["file"] = fields["file"]
    fmt = sniff_format(data)
    if fmt not in ("JPEG", "PNG"):
        meta["reencoded_from"] = fmt
        data = encode_png(im)
    return make_record(data, im.width, im.height, fields["captions"], fields["questions"], fields["answers"],
                       source=source, meta=meta)


__all__ = [
    "LABEL_CONFIG", "Annotation", "TaskAnnotations", "caption_set_similarity", "data_uri", "export_tasks",
    "fleiss_kappa", "import_export", "ingest_labelstudio", "krippendorff_alpha_nominal", "merge_annotations",
    "normalize_answer", "token_f1", "write_review",
]
