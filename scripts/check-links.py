#!/usr/bin/env python3
"""Checks the relative links of the repository's Markdown: every link in README.md,
ARCHITECTURE.md and docs/*.md (and the READMEs under crates/ and tests/) names a file or
directory inside the repository, and every #anchor a heading of the page it points to.
Links to the web are left alone. Exits 1 naming each broken link."""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: pathlib.Path) -> set:
    """GitHub's anchors of the page's headings: lower case, punctuation dropped, spaces
    as hyphens."""
    out = set()
    for line in page.read_text().splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            out.add(text.replace(" ", "-"))
    return out


def pages():
    yield from (ROOT / p for p in ("README.md", "ARCHITECTURE.md"))
    yield from sorted((ROOT / "docs").glob("*.md"))
    for sub in ("crates", "tests"):
        yield from sorted((ROOT / sub).glob("*/README.md"))


def main() -> int:
    broken, checked = [], 0
    for page in pages():
        in_code = False
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_code = not in_code
            if in_code:
                continue
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):
                    continue  # the web, mail
                checked += 1
                path, _, anchor = target.partition("#")
                dest = (page.parent / path).resolve() if path else page
                where = f"{page.relative_to(ROOT)}:{n}: {target}"
                if ROOT not in dest.parents and dest != ROOT:
                    broken.append(f"{where}: points outside the repository")
                elif not dest.exists():
                    broken.append(f"{where}: no such file")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    broken.append(f"{where}: no heading #{anchor} there")
    for b in broken:
        print(f"broken link: {b}", file=sys.stderr)
    print(f"{checked} relative links checked, {len(broken)} broken")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
