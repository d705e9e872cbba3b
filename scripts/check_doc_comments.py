#!/usr/bin/env python3
"""Find public declarations in devgate's headers that lack a `///` comment.

The project standard (docs/STYLE): every public type and function has a one-line `///`
comment. "Public" is anything declared in a devgate namespace that is not a `detail*` or
anonymous namespace, and, inside a class, in a public section of a public class. Checked:
classes, structs, unions, enums, concepts, type aliases, free functions, variables and
constants, member functions, constructors, data members and (for enums written over several
lines) enumerators.

A declaration is documented when the lines just above it (a run of `//` comment lines with no
blank line in between) include a `///` line, or when one of its own lines has a trailing
`///<` comment. Not checked: `= delete` declarations, destructors, `friend` and
`static_assert` declarations, `using namespace`, forward declarations, out-of-class
definitions of members (`T X::f(...) {`), anything outside namespace devgate, and the
enumerators of an enum written on one line (the enum's own comment covers them).

It is a heuristic, not a C++ parser: it removes comments, strings, character literals and
preprocessor lines, then follows braces, parentheses and access specifiers.

Usage: scripts/check_doc_comments.py [--exclude GLOB]... [PATH]...
PATH is a header or a folder (searched for *.hpp); by default include/devgate. GLOB is
matched against paths relative to the repository root (e.g. 'include/devgate/pipeline/*').
Prints one line per finding (path:line: kind name: first line of the declaration) and exits
1 when there is any finding, 0 otherwise. `--list` prints every public declaration checked
(documented ones too), to see what the heuristics cover.
"""
import argparse
import fnmatch
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_PATH = ROOT / "include" / "devgate"

ACCESS = re.compile(r"^(public|private|protected)\s*:(?!:)")
TYPE_HEAD = re.compile(r"^(?:template\s*<.*>\s*)?(?:\[\[[^\]]*\]\]\s*)*(class|struct|union)\b")
ENUM_HEAD = re.compile(r"^(?:\[\[[^\]]*\]\]\s*)*enum\b")
NAMESPACE_HEAD = re.compile(r"^(?:inline\s+)?namespace\b\s*([\w:]*)")
IDENT = re.compile(r"[A-Za-z_]\w*")
KEYWORD_TAIL = {"const", "noexcept", "override", "final", "volatile", "mutable"}


def strip_code(text: str) -> str:
    """Replaces comments, string and character literals and preprocessor lines with spaces,
    keeping every newline so that offsets map to the same line numbers."""
    out = []
    i, n = 0, len(text)
    at_line_start = True
    while i < n:
        c = text[i]
        if at_line_start and c == "#":
            # A preprocessor directive, with its backslash continuations.
            j = i
            while j < n:
                k = text.find("\n", j)
                if k == -1:
                    k = n
                if k > 0 and text[k - 1] == "\\":
                    j = k + 1
                    continue
                break
            out.append(re.sub(r"[^\n]", " ", text[i:k]))
            i = k
            continue
        if c == "\n":
            at_line_start = True
            out.append(c)
            i += 1
            continue
        if not c.isspace():
            at_line_start = False
        if text.startswith("//", i):
            k = text.find("\n", i)
            k = n if k == -1 else k
            out.append(" " * (k - i))
            i = k
            continue
        if text.startswith("/*", i):
            k = text.find("*/", i + 2)
            k = n if k == -1 else k + 2
            out.append(re.sub(r"[^\n]", " ", text[i:k]))
            i = k
            continue
        raw = re.match(r'(?:u8|u|U|L)?R"([^()\\\s]{0,16})\(', text[i:i + 24])
        if raw and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            close = ")" + raw.group(1) + '"'
            k = text.find(close, i + raw.end())
            k = n if k == -1 else k + len(close)
            out.append('""' + re.sub(r"[^\n]", " ", text[i + 2:k]))
            i = k
            continue
        if c == '"' or (c == "'" and not (i > 0 and text[i - 1].isalnum())):
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            out.append(c + " " * (min(j, n) - i - 1) + (c if j < n else ""))
            i = j + 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def flatten_parens(s: str) -> str:
    """`f(a, (b)) const` -> `f() const`: what is left at parenthesis depth 0."""
    out, depth = [], 0
    for c in s:
        if c == "(":
            if depth == 0:
                out.append("(")
            depth += 1
        elif c == ")":
            depth = max(0, depth - 1)
            if depth == 0:
                out.append(")")
        elif depth == 0:
            out.append(c)
    return "".join(out)


def flatten_angles(s: str) -> str:
    """Drops template argument lists (`a<b, c<d>>` -> `a<>`) from a parenthesis-free text."""
    prev = None
    while prev != s:
        prev = s
        s = re.sub(r"<[^<>]*>", "\x01", s)
    return s.replace("\x01", "<>")


def declared_name(decl: str) -> tuple[str, str]:
    """A (kind, name) pair for a declaration's text (best effort, for messages)."""
    flat = flatten_parens(decl)
    flat = re.sub(r"^template\s*<.*?>\s*(requires\s+[^ ]+\s+)?", "", flatten_angles(flat))
    flat = re.sub(r"\[\[[^\]]*\]\]", "", flat).strip()
    m = TYPE_HEAD.match(flat)
    if m:
        name = IDENT.search(flat, m.end())
        return m.group(1), name.group(0) if name else "?"
    if ENUM_HEAD.match(flat):
        rest = re.sub(r"^enum\s+(class|struct)?", "", flat)
        name = IDENT.search(rest)
        return "enum", name.group(0) if name else "?"
    if flat.startswith("concept"):
        name = IDENT.search(flat, len("concept"))
        return "concept", name.group(0) if name else "?"
    if flat.startswith("using"):
        name = IDENT.search(flat, len("using"))
        return "alias", name.group(0) if name else "?"
    op = re.search(r"\boperator\s*(\(\)|[^\s(]+)\s*\(", flat)
    if op:
        return "function", "operator" + op.group(1)
    head = flat.split("=", 1)[0]
    if "(" in head:
        before = head[: head.index("(")].rstrip()
        names = IDENT.findall(before)
        return "function", names[-1] if names else "?"
    names = IDENT.findall(head.split("{", 1)[0])
    return "variable", names[-1] if names else "?"


def skipped(decl: str, at_namespace: bool) -> bool:
    """True for declarations the standard does not ask a comment for."""
    d = " ".join(decl.split())
    if not d:
        return True
    if re.match(r"^(static_assert|friend|using\s+namespace)\b", d):
        return True
    if re.search(r"=\s*delete\s*$", d):
        return True
    flat = flatten_parens(d)
    if re.search(r"(^|[\s:])~\w+\s*\(", flat):  # destructor
        return True
    if re.match(r"^(template\s*<.*>\s*)?(class|struct|union)\s+\w+\s*$", d):  # forward declaration
        return True
    if at_namespace:
        # An out-of-class definition of a member declared (and documented) in its class.
        head = flatten_angles(flat).split("(", 1)[0]
        if re.search(r"\w+(<>)?\s*::\s*~?\w+\s*$", head) and "(" in flat:
            return True
    return False


class Scope:
    def __init__(self, kind: str, public: bool, access_public: bool = True, path=None):
        self.path = path or []  # namespaces: the names from the global scope
        self.kind = kind  # namespace, class, enum, body
        self.public = public  # the scope itself is part of the public API
        self.access_public = access_public  # current access section (classes)


def documented(lines: list[str], first: int, last: int) -> bool:
    """Whether the declaration on lines first..last (0-based) carries a doc comment."""
    if any("///<" in lines[k] for k in range(first, min(last, len(lines) - 1) + 1)):
        return True
    k = first - 1
    while k >= 0 and lines[k].strip().startswith("//"):
        if lines[k].strip().startswith("///") and not lines[k].strip().startswith("////"):
            return True
        k -= 1
    return False


def check_file(path: pathlib.Path, list_all: bool = False) -> list[tuple]:
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    code = strip_code(text)
    line_of = []
    ln = 0
    for c in code:
        line_of.append(ln)
        if c == "\n":
            ln += 1
    line_of.append(ln)

    findings = []
    stack = [Scope("namespace", public=False)]  # global scope: outside devgate
    decl_start = None  # offset of the first character of the current declaration
    paren = 0
    angle_text = []  # the current declaration's text
    enum_items = []  # (start offset, text) of the enumerators of the enum being read

    def report(start: int, end: int, decl: str, is_enumerator: bool = False):
        first, last = line_of[start], line_of[max(start, end)]
        ok = documented(lines, first, last)
        if ok and not list_all:
            return
        if is_enumerator:
            kind, name = "enumerator", (IDENT.findall(decl) or ["?"])[0]
        else:
            kind, name = declared_name(decl)
        findings.append((first + 1, kind, name, lines[first].strip(), ok))

    def finish_decl(end: int):
        nonlocal decl_start, angle_text
        scope = stack[-1]
        decl = "".join(angle_text).strip()
        if decl_start is not None and scope.kind in ("namespace", "class"):
            visible = scope.public and (scope.kind == "namespace" or scope.access_public)
            if visible and not skipped(decl, scope.kind == "namespace"):
                report(decl_start, end, decl)
        decl_start = None
        angle_text = []

    i, n = 0, len(code)
    while i < n:
        c = code[i]
        scope = stack[-1]
        if scope.kind == "body":
            if c == "{":
                stack.append(Scope("body", public=False))
            elif c == "}":
                stack.pop()
            i += 1
            continue
        if scope.kind == "enum":
            if c == "}":
                if decl_start is not None and "".join(angle_text).strip():
                    enum_items.append((decl_start, i - 1, "".join(angle_text)))
                if scope.public and scope.access_public:
                    for start, end, item in enum_items:
                        report(start, end, item, is_enumerator=True)
                enum_items = []
                decl_start, angle_text = None, []
                stack.pop()
            elif c == "," and paren == 0:
                enum_items.append((decl_start if decl_start is not None else i, i, "".join(angle_text)))
                decl_start, angle_text = None, []
            else:
                if c == "(":
                    paren += 1
                elif c == ")":
                    paren -= 1
                if decl_start is None and not c.isspace():
                    decl_start = i
                if decl_start is not None:
                    angle_text.append(c)
            i += 1
            continue

        # Namespace or class scope: collect one declaration at a time.
        if c == "(":
            paren += 1
        elif c == ")":
            paren = max(0, paren - 1)
        if paren > 0 or c in "()":
            if decl_start is None and not c.isspace():
                decl_start = i
            angle_text.append(c)
            if c == "{" or c == "}":
                pass  # braces inside parentheses (default arguments) are part of the text
            i += 1
            continue
        if c == ";":
            finish_decl(i)
            i += 1
            continue
        if c == "}":
            finish_decl(i)
            stack.pop()
            if not stack:
                stack.append(Scope("namespace", public=False))
            i += 1
            continue
        if c == ":" and scope.kind == "class":
            current = "".join(angle_text).strip()
            m = ACCESS.match(current + ":" + code[i + 1:i + 2])
            if m and current == m.group(1):
                scope.access_public = m.group(1) == "public"
                decl_start, angle_text = None, []
                i += 1
                continue
        if c == "{":
            decl = "".join(angle_text).strip()
            flat = " ".join(flatten_parens(decl).split())
            ns = NAMESPACE_HEAD.match(flat)
            if ns and not re.search(r"=", flat):
                names = [p for p in ns.group(1).split("::") if p]
                path = (scope.path if scope.kind == "namespace" else ["?"]) + (names or ["<anonymous>"])
                public = path[0] == "devgate" and not any(
                    p.startswith("detail") or p == "<anonymous>" for p in path)
                stack.append(Scope("namespace", public=public, path=path))
                decl_start, angle_text = None, []
            elif TYPE_HEAD.match(flat) and "(" not in flat.split("{")[0].split("=")[0]:
                visible = scope.public and (scope.kind == "namespace" or scope.access_public)
                if visible:
                    report(decl_start if decl_start is not None else i, i, decl)
                is_struct = TYPE_HEAD.match(flat).group(1) in ("struct", "union")
                stack.append(Scope("class", public=visible, access_public=is_struct))
                decl_start, angle_text = None, []
            elif ENUM_HEAD.match(flat):
                visible = scope.public and (scope.kind == "namespace" or scope.access_public)
                if visible:
                    report(decl_start if decl_start is not None else i, i, decl)
                close = code.find("}", i)
                one_line = close != -1 and line_of[close] == line_of[i]
                stack.append(Scope("enum", public=visible and not one_line))
                decl_start, angle_text = None, []
                enum_items = []
            else:
                # A function body, a braced initializer or a requires-expression: the
                # declaration ends here; its body is skipped.
                if decl_start is not None:
                    finish_decl(i)
                stack.append(Scope("body", public=False))
            i += 1
            continue
        if decl_start is None and not c.isspace():
            decl_start = i
        if decl_start is not None:
            angle_text.append(c)
        i += 1
    return findings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=pathlib.Path, default=[DEFAULT_PATH])
    parser.add_argument("--exclude", action="append", default=[],
                        help="glob of repository-relative paths to skip (repeatable)")
    parser.add_argument("--list", action="store_true",
                        help="list every public declaration checked, documented or not")
    args = parser.parse_args()

    files = []
    for p in args.paths:
        p = p.resolve()
        files.extend(sorted(p.rglob("*.hpp")) if p.is_dir() else [p])
    total = checked = 0
    for f in files:
        try:
            rel = f.relative_to(ROOT).as_posix()
        except ValueError:
            rel = f.as_posix()
        if any(fnmatch.fnmatch(rel, g) for g in args.exclude):
            continue
        checked += 1
        for line, kind, name, src, ok in check_file(f, args.list):
            print(f"{rel}:{line}: {'documented' if ok else 'undocumented'} {kind} '{name}': {src}")
            total += 0 if ok else 1
    print(f"{total} public declaration(s) without a /// comment in {checked} file(s)",
          file=sys.stderr)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
