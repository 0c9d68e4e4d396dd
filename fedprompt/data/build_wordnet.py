"""Build the packaged WordNet noun-supersense classification data set (and its verb sibling).

The data set pairs the definition part of every WordNet 3.0 noun gloss with the noun's
*supersense*: the lexicographer file the synset was filed in (``noun.animal``,
``noun.artifact``, ... 26 classes in all). It is built from the database files of Debian's
``wordnet-base`` package and written, with WordNet's licence beside it, into
``fedprompt/data/wordnet``::

    apt-get install -y wordnet-base
    python -m fedprompt.data.build_wordnet [--wordnet-dir /usr/share/wordnet] \
        [--out fedprompt/data/wordnet]

``--pos verb --out DIR`` builds the same task from the verb glosses (15 verb supersenses,
``verb.motion``, ``verb.communication``, ...) as a user would hand it to ``fedprompt run``:
``DIR/train.jsonl`` and ``DIR/test.jsonl`` (``{"text", "label"}`` lines, split as below) and
the licence::

    python -m fedprompt.data.build_wordnet --pos verb --out verbs
    fedprompt run --data verbs/train.jsonl --test-data verbs/test.jsonl

The output is reproducible: the train/test split is decided by a hash of each text (so an
example never changes sides between builds) and the gzip header carries no time stamp or
file name, so rebuilding from the same WordNet files gives byte-identical output.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import hashlib
import io
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

DATA_FILE_NAME = "wordnet_supersenses.jsonl.gz"
LICENSE_FILE_NAME = "WORDNET_LICENSE.txt"
DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
DEFAULT_COPYRIGHT_PATH = Path("/usr/share/doc/wordnet-base/copyright")
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "wordnet"

#: Share of examples (in 1/10000ths of the hash range) that go to the test split.
TEST_SHARE_PER_10000 = 2000
#: Definitions with fewer words than this are dropped as too short to classify.
MIN_WORDS = 3

#: The 26 noun lexicographer files of WordNet 3.0 (see ``lexnames(5WN)``), by number.
NOUN_LEXNAMES: Mapping[int, str] = {
    3: "noun.Tops",
    4: "noun.act",
    5: "noun.animal",
    6: "noun.artifact",
    7: "noun.attribute",
    8: "noun.body",
    9: "noun.cognition",
    10: "noun.communication",
    11: "noun.event",
    12: "noun.feeling",
    13: "noun.food",
    14: "noun.group",
    15: "noun.location",
    16: "noun.motive",
    17: "noun.object",
    18: "noun.person",
    19: "noun.phenomenon",
    20: "noun.plant",
    21: "noun.possession",
    22: "noun.process",
    23: "noun.quantity",
    24: "noun.relation",
    25: "noun.shape",
    26: "noun.state",
    27: "noun.substance",
    28: "noun.time",
}

#: The 15 verb lexicographer files of WordNet 3.0 (see ``lexnames(5WN)``), by number.
VERB_LEXNAMES: Mapping[int, str] = {
    29: "verb.body",
    30: "verb.change",
    31: "verb.cognition",
    32: "verb.communication",
    33: "verb.competition",
    34: "verb.consumption",
    35: "verb.contact",
    36: "verb.creation",
    37: "verb.emotion",
    38: "verb.motion",
    39: "verb.perception",
    40: "verb.possession",
    41: "verb.social",
    42: "verb.stative",
    43: "verb.weather",
}

#: Lexicographer files by part of speech, and each one's database file.
LEXNAMES: Mapping[str, Mapping[int, str]] = {"noun": NOUN_LEXNAMES, "verb": VERB_LEXNAMES}
DATA_FILES: Mapping[str, str] = {"noun": "data.noun", "verb": "data.verb"}

# A quoted usage example tacked onto the definition with a colon instead of a semicolon,
# e.g. 'act of assembling ... for war: "mobilization of the troops"'.
_TRAILING_COLON_EXAMPLE = re.compile(r'\s*:\s*"[^"]*"?\s*$')
_WHITESPACE = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True)
class BuildSummary:
    """What one build wrote.

    Attributes:
        path: The data file written.
        num_bytes: Its size in bytes.
        split_counts: Examples per split, ``{"train": n, "test": m}``.
        label_counts: Examples per label (both splits together), sorted by label name.
        num_synsets: Noun synset lines read.
        num_too_short: Definitions dropped for having fewer than ``MIN_WORDS`` words.
        num_duplicates: Repeated (text, label) pairs dropped, keeping the first.
        num_conflicting: Texts dropped because they occur under more than one label.
    """

    path: Path
    num_bytes: int
    split_counts: dict[str, int]
    label_counts: dict[str, int]
    num_synsets: int
    num_too_short: int
    num_duplicates: int
    num_conflicting: int


def read_lexnames(wordnet_dir: Path, pos: str = "noun") -> dict[int, str]:
    """Returns the lexicographer file names of part of speech ``pos`` by number.

    Reads ``lexnames`` from ``wordnet_dir`` when it is there (lines ``NN name pos``, where
    pos 1 marks nouns and 2 verbs); Debian's ``wordnet-base`` does not ship it, in which
    case the standard WordNet 3.0 list is used.

    Args:
        wordnet_dir: Folder holding the WordNet database files.
        pos: ``noun`` or ``verb``.

    Returns:
        Mapping from lexicographer file number to its name, ``pos`` only.
    """
    if pos not in LEXNAMES:
        raise ValueError(f"pos must be one of {sorted(LEXNAMES)}, got {pos!r}")
    path = Path(wordnet_dir) / "lexnames"
    if not path.is_file():
        return dict(LEXNAMES[pos])
    number = {"noun": "1", "verb": "2"}[pos]
    names = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[2] == number and fields[1].startswith(f"{pos}."):
            names[int(fields[0])] = fields[1]
    return names


def definition_of(gloss: str) -> str:
    """Returns the definition part of a WordNet gloss, without its usage examples.

    A gloss is a definition, possibly in several ``;``-separated parts, followed by quoted
    example sentences: ``'a member of the genus Canis ...; occurs in many breeds; "the dog
    barked all night"'`` gives ``'a member of the genus Canis ...; occurs in many breeds'``.
    Everything from the first part that opens with a double quote is dropped, as is a
    final example attached with a colon; whitespace is collapsed.

    Args:
        gloss: The text after ``|`` on a ``data.noun`` (or ``data.verb``) line.

    Returns:
        The definition, possibly empty.
    """
    parts = []
    for part in gloss.split(";"):
        stripped = part.strip()
        if stripped.startswith('"'):
            break
        if stripped:
            parts.append(stripped)
    definition = "; ".join(parts)
    definition = _TRAILING_COLON_EXAMPLE.sub("", definition)
    if definition.count('"') % 2 == 1 and definition.endswith('"'):
        definition = definition[:-1]  # a stray closing quote (a few WordNet typos)
    return _WHITESPACE.sub(" ", definition).strip()


def parse_data_line(line: str, lexnames: Mapping[int, str]) -> tuple[str, str] | None:
    """Parses one ``data.noun`` (or ``data.verb``) line into ``(label, definition)``.

    The line format (``wndb(5WN)``) is ``offset lex_filenum ss_type w_cnt word lex_id ...
    | gloss``; ``lex_filenum`` is the second field.

    Args:
        line: One line of ``data.noun``.
        lexnames: Lexicographer file names by number, as from :func:`read_lexnames`.

    Returns:
        The supersense name and the gloss's definition, or ``None`` for licence header
        lines (which start with spaces), lines without a gloss, and lexicographer files
        that are not in ``lexnames``.
    """
    if not line.strip() or line.startswith(" "):
        return None
    head, separator, gloss = line.partition(" | ")
    if not separator:
        return None
    fields = head.split()
    if len(fields) < 2 or not fields[1].isdigit():
        return None
    label = lexnames.get(int(fields[1]))
    if label is None:
        return None
    return label, definition_of(gloss)


def split_of(text: str) -> str:
    """Returns ``"test"`` for about 20% of texts and ``"train"`` for the rest.

    The choice depends on the SHA-256 digest of the text alone, so it never changes
    between builds or when other examples are added or removed.

    Args:
        text: An example's text.

    Returns:
        ``"train"`` or ``"test"``.
    """
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 10000
    return "test" if bucket < TEST_SHARE_PER_10000 else "train"


def build_records(
    lines: Iterable[str], lexnames: Mapping[int, str]
) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Turns ``data.noun`` (or ``data.verb``) lines into data set records.

    Drops definitions shorter than ``MIN_WORDS`` words, keeps the first of repeated
    (text, label) pairs, and drops every copy of a text that appears under two or more
    labels (such an example has no single right answer).

    Args:
        lines: Lines of ``data.noun``.
        lexnames: Lexicographer file names by number.

    Returns:
        The records ``{"text", "label", "split"}`` in file order, and counts of what was
        read and dropped (``synsets``, ``too_short``, ``duplicates``, ``conflicting``).
    """
    labels_by_text: dict[str, list[str]] = {}
    stats = collections.Counter(synsets=0, too_short=0, duplicates=0, conflicting=0)
    for line in lines:
        parsed = parse_data_line(line, lexnames)
        if parsed is None:
            continue
        stats["synsets"] += 1
        label, text = parsed
        if len(text.split()) < MIN_WORDS:
            stats["too_short"] += 1
            continue
        seen = labels_by_text.setdefault(text, [])
        if label in seen:
            stats["duplicates"] += 1
        else:
            seen.append(label)
    records = []
    for text, labels in labels_by_text.items():
        if len(labels) > 1:
            stats["conflicting"] += len(labels)
            continue
        records.append({"text": text, "label": labels[0], "split": split_of(text)})
    return records, dict(stats)


def encode_records(records: Sequence[Mapping[str, str]]) -> bytes:
    """Serialises records as gzip-compressed JSON lines with a fixed header.

    Args:
        records: The records to write, in order.

    Returns:
        The gzip bytes; the same records always give the same bytes.
    """
    text = "".join(json.dumps(dict(record), ensure_ascii=False) + "\n" for record in records)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    return buffer.getvalue()


def write_dataset(data_noun: Path, out_path: Path, lexnames: Mapping[int, str]) -> BuildSummary:
    """Builds the data set from a ``data.noun`` file and writes it to ``out_path``.

    Args:
        data_noun: Path of WordNet's ``data.noun``.
        out_path: Path of the ``.jsonl.gz`` file to write (its folder is created).
        lexnames: Lexicographer file names by number.

    Returns:
        A summary of what was written.
    """
    with open(data_noun, encoding="utf-8") as lines:
        records, stats = build_records(lines, lexnames)
    payload = encode_records(records)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(payload)
    split_counts = collections.Counter(record["split"] for record in records)
    label_counts = collections.Counter(record["label"] for record in records)
    return BuildSummary(
        path=out_path,
        num_bytes=len(payload),
        split_counts={"train": split_counts["train"], "test": split_counts["test"]},
        label_counts=dict(sorted(label_counts.items())),
        num_synsets=stats["synsets"],
        num_too_short=stats["too_short"],
        num_duplicates=stats["duplicates"],
        num_conflicting=stats["conflicting"],
    )


def write_user_files(data_file: Path, out_dir: Path, lexnames: Mapping[int, str]) -> BuildSummary:
    """Builds the data set from a WordNet database file as two plain JSONL files a user would
    pass to ``fedprompt run --data train.jsonl --test-data test.jsonl``.

    Args:
        data_file: Path of WordNet's ``data.noun`` or ``data.verb``.
        out_dir: Folder to write ``train.jsonl`` and ``test.jsonl`` into (created).
        lexnames: Lexicographer file names by number.

    Returns:
        A summary of what was written (``path``: the training file, ``num_bytes``: both files).
    """
    with open(data_file, encoding="utf-8") as lines:
        records, stats = build_records(lines, lexnames)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = 0
    for split in ("train", "test"):
        text = "".join(json.dumps({"text": r["text"], "label": r["label"]}, ensure_ascii=False) + "\n"
                       for r in records if r["split"] == split)
        (out_dir / f"{split}.jsonl").write_text(text, encoding="utf-8")
        sizes += len(text.encode("utf-8"))
    split_counts = collections.Counter(record["split"] for record in records)
    label_counts = collections.Counter(record["label"] for record in records)
    return BuildSummary(
        path=out_dir / "train.jsonl",
        num_bytes=sizes,
        split_counts={"train": split_counts["train"], "test": split_counts["test"]},
        label_counts=dict(sorted(label_counts.items())),
        num_synsets=stats["synsets"],
        num_too_short=stats["too_short"],
        num_duplicates=stats["duplicates"],
        num_conflicting=stats["conflicting"],
    )


def license_text(copyright_text: str, pos: str = "noun", data_name: str = DATA_FILE_NAME) -> str:
    """Returns the licence file's text: a provenance header, then the WordNet licence.

    Args:
        copyright_text: Contents of Debian's ``/usr/share/doc/wordnet-base/copyright``
            (machine-readable format); only its WordNet stanza is kept.
        pos: The part of speech whose glosses the data holds (``noun`` or ``verb``).
        data_name: The data file(s) the licence travels with.

    Returns:
        The text to write to ``WORDNET_LICENSE.txt``.
    """
    example = {"noun": "noun.animal", "verb": "verb.motion"}[pos]
    header = (
        f"{data_name} {'are' if ' and ' in data_name else 'is'} derived from WordNet 3.0 (Princeton University).\n"
        "\n"
        f"Each example is the definition part of the gloss of one WordNet 3.0 {pos} synset\n"
        "(usage examples removed), labelled with the synset's lexicographer file (its\n"
        f"{pos} supersense, e.g. {example}). Definitions under three words and texts that\n"
        "occur under two supersenses were dropped; repeated texts were kept once. It was\n"
        "built from the database files of the Debian package wordnet-base by\n"
        "fedprompt/data/build_wordnet.py. WordNet's licence, which must accompany\n"
        "all copies of the database and works derived from it, follows.\n"
        "\n"
        "WordNet: https://wordnet.princeton.edu/\n"
        "\n"
    )
    stanza = wordnet_license_stanza(copyright_text)
    return header + "-" * 72 + "\n\n" + stanza


def wordnet_license_stanza(copyright_text: str) -> str:
    """Extracts the WordNet copyright and licence from a Debian copyright file."""
    lines = copyright_text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Copyright:")), None)
    if start is None or "Princeton" not in copyright_text:
        return copyright_text  # not the expected format: keep it whole
    out = [line for line in lines[start : start + 1]]
    for line in lines[start + 1 :]:
        if not line.strip():
            break  # end of the paragraph (the debian/* stanza follows)
        if line.startswith(" "):
            body = line[1:]
            out.append("" if body.strip() == "." else body)
        else:
            out.append(line)
    return "\n".join(out).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=DEFAULT_WORDNET_DIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--copyright", type=Path, default=DEFAULT_COPYRIGHT_PATH)
    parser.add_argument("--pos", choices=sorted(LEXNAMES), default="noun",
                        help="noun: the packaged data set; verb: train.jsonl and test.jsonl in --out")
    args = parser.parse_args(argv)
    if args.pos != "noun" and args.out == DEFAULT_OUT_DIR:
        parser.error("--pos verb writes user files: give their folder with --out")

    data_file = args.wordnet_dir / DATA_FILES[args.pos]
    if not data_file.is_file():
        parser.error(f"{data_file} not found (apt-get install wordnet-base)")
    if not args.copyright.is_file():
        parser.error(f"{args.copyright} not found: the WordNet licence must ship with the data")

    lexnames = read_lexnames(args.wordnet_dir, args.pos)
    if args.pos == "noun":
        summary = write_dataset(data_file, args.out / DATA_FILE_NAME, lexnames)
        data_name = DATA_FILE_NAME
    else:
        summary = write_user_files(data_file, args.out, lexnames)
        data_name = "train.jsonl and test.jsonl"
    (args.out / LICENSE_FILE_NAME).write_text(
        license_text(args.copyright.read_text(encoding="utf-8"), args.pos, data_name), encoding="utf-8"
    )

    print(f"wrote {summary.path} ({summary.num_bytes:,} bytes)")
    print(
        f"synsets read {summary.num_synsets}, too short {summary.num_too_short}, "
        f"duplicates {summary.num_duplicates}, conflicting {summary.num_conflicting}"
    )
    print(f"train {summary.split_counts['train']}, test {summary.split_counts['test']}")
    for label, count in summary.label_counts.items():
        print(f"  {label:20s} {count:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
