"""CoNLL-style token files for token classification: one token per line with its tag in the last field
(TAB-separated, else split on spaces), a blank line between sentences, `-DOCSTART-` lines skipped.

Read into rows of words and tags (the `tokens` data format's columns), with BIO checked per the recipe's
`data.bio`; predictions written back the same way, one word and its predicted tag per line. Tokens are kept
as the file has them: a prefix such as WikiANN's `en:` is stripped when a row is tokenised
(`data.token_prefix`), so a prediction file lines up with its input line for line.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from peftrun.errors import PeftrunError

# `data.format: tokens` reads files with these endings (and none at all: WikiANN's `train`) as CoNLL;
# `data.format: conll` reads every file as CoNLL.
CONLL_SUFFIXES = (".conll", ".txt", "")
DOCSTART = "-DOCSTART-"


def is_conll(path: str | Path, data_cfg) -> bool:
    """Whether the recipe reads `path` as a CoNLL file."""
    fmt = getattr(data_cfg, "format", None)
    return fmt == "conll" or (fmt == "tokens" and Path(path).suffix.lower() in CONLL_SUFFIXES)


def _fields(line: str) -> list[str]:
    return line.split("\t") if "\t" in line else line.split()


def _not_bio(tag: str) -> str | None:
    prefix, dash, kind = tag.partition("-")
    if tag == "O" or (prefix in ("B", "I") and dash and kind):
        return None
    return f"tag '{tag}' is not BIO (O, B-TYPE or I-TYPE)"


def _dangling(tag: str, previous: str | None) -> str | None:
    """Why an I-X here opens no entity of its own in BIO (IOB2): it follows neither B-X nor I-X."""
    kind = tag[2:]
    if not tag.startswith("I-") or previous in (f"B-{kind}", f"I-{kind}"):
        return None
    after = f"'{previous}'" if previous else "the start of the sentence"
    return f"'{tag}' follows {after}: an I- tag must continue a B-{kind} or I-{kind}"


def read_conll(
    path: str | Path, *, bio: str = "check", labelled: bool | None = True
) -> tuple[list[list[str]], list[list[str]] | None]:
    """(words per sentence, tags per sentence) of a CoNLL file; tags None for an unlabelled file.

    labelled=True: every token line needs a tag. labelled=None (predict input): tags are optional, but a
    file has them on every line or on none. bio: "check" refuses an I-X that follows neither B-X nor I-X
    (and tags that are not O/B-X/I-X), "repair" reads such an I-X as B-X, "off" takes tags as they are.
    Every problem is one PeftrunError naming the file and line.
    """
    path = Path(path)
    sentences: list[list[str]] = []
    tag_rows: list[list[str]] = []
    words: list[str] = []
    tags: list[str] = []
    first_line: dict[bool, int] = {}  # has a tag -> the first line that did (or did not)

    def close() -> None:
        if words:
            sentences.append(list(words))
            tag_rows.append(list(tags))
            words.clear()
            tags.clear()

    try:
        with open(path, encoding="utf-8") as fh:
            for number, raw in enumerate(fh, 1):
                line = raw.rstrip("\r\n")
                if not line.strip():
                    close()
                    continue
                fields = _fields(line)
                token = fields[0]
                if token.startswith(DOCSTART):
                    close()
                    continue
                where = f"{path}:{number}"
                if not token.strip():
                    raise PeftrunError("a tag with no token before it", where=where)
                tag = fields[-1].strip() if len(fields) > 1 else ""
                has_tag = bool(tag)
                first_line.setdefault(has_tag, number)
                if not has_tag and labelled:
                    raise PeftrunError(
                        f"no tag after the token '{token[:40]}'",
                        where=where,
                        hint="each line is TOKEN<TAB>TAG (or TOKEN TAG), with a blank line between sentences",
                    )
                if labelled is None and len(first_line) == 2:
                    other = first_line[not has_tag]
                    raise PeftrunError(
                        f"this line {'has a tag' if has_tag else 'has no tag'} but line {other} "
                        f"{'has none' if has_tag else 'has one'}",
                        where=where,
                        hint="give every token its tag, or none at all (one token per line)",
                    )
                if has_tag and bio != "off":
                    problem = _not_bio(tag)
                    if problem is None and (dangling := _dangling(tag, tags[-1] if tags else None)):
                        if bio == "repair":
                            tag = "B-" + tag[2:]
                        else:
                            problem = dangling
                    if problem:
                        raise PeftrunError(
                            problem,
                            where=where,
                            hint="set data.bio: repair to read such an I- as B-, or data.bio: off for tags "
                            "that are not BIO",
                        )
                words.append(token)
                tags.append(tag)
    except UnicodeDecodeError as exc:
        raise PeftrunError(f"not UTF-8 text (byte {exc.start})", where=str(path)) from None
    except OSError as exc:
        raise PeftrunError(f"cannot read the file: {exc.strerror}", where=str(path)) from None
    close()
    labelled_file = labelled or (labelled is None and first_line.get(True) is not None)
    return sentences, (tag_rows if labelled_file else None)


def conll_dataset(path: str | Path, data_cfg, *, labelled: bool | None = True):
    """A CoNLL file as a `datasets.Dataset` with the recipe's tokens (and tags) columns."""
    import datasets

    words, tags = read_conll(path, bio=data_cfg.bio, labelled=labelled)
    columns = {data_cfg.tokens_column: words}
    if tags is not None:
        columns[data_cfg.tags_column] = tags
    return datasets.Dataset.from_dict(columns)


def write_conll(sentences: Sequence[Sequence[str]], tags: Sequence[Sequence[str]], path: str | Path) -> None:
    """Word TAB tag per line, a blank line after each sentence; through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            for words, row in zip(sentences, tags):
                fh.writelines(f"{w}\t{t}\n" for w, t in zip(words, row))
                fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
