"""android_demo/ without an Android toolchain: API use, version pins, prompt template.

The APK cannot be built on this machine (no Google Maven), so these tests check what can be
checked from the sources:

- every member of ExecuTorch's Android API that the Kotlin sources use (constructor calls,
  method calls, members reached through builder chains, callback overrides) is in
  android_demo/executorch_android_api.txt, the API read from the published sources of the
  pinned release, with a matching number of arguments;
- the Gradle files pin org.pytorch:executorch-android to that release, which is also the
  exporter's executorch pin in pyproject.toml, and minSdk is 28;
- the Kotlin prompt template equals android_demo/prompt_template.txt, which the host twin reads.

The Kotlin reader is a small lexer plus regular expressions, not a compiler. It relies on one
convention, stated in ChatEngine.kt: a value of an ExecuTorch type is declared with its type
written out (`val m: LlmModule = ...`), and an untyped declaration whose right side involves one
is reported, so no member use goes unchecked. Such names are tracked per file, so within a file
a name keeps one meaning. The test_checker_* tests show the reader catching wrong uses.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "android_demo"
API_FILE = DEMO / "executorch_android_api.txt"
KOTLIN_DIR = DEMO / "app" / "src" / "main" / "java"
ARTIFACT = "org.pytorch:executorch-android"


# --- the API listing ---------------------------------------------------------------------

@dataclass
class Member:
    name: str            # "constructor" for constructors
    kind: str            # constructor | fun | val | const
    params: list[str]
    returns: str | None
    static: bool = False
    abstract: bool = False
    unconfirmed: bool = False


@dataclass
class ApiClass:
    fqn: str
    kind: str            # class | interface
    members: list[Member] = field(default_factory=list)

    def named(self, name: str) -> list[Member]:
        return [m for m in self.members if m.name == name]


def split_top_level(text: str) -> list[str]:
    """Split on commas outside (), [], {}, <>; drops an empty trailing item (trailing comma)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    parts = [p.strip() for p in parts]
    if parts and parts[-1] == "":
        parts.pop()
    return [] if parts == [""] else parts


_MEMBER = re.compile(
    r"^(?P<mods>(?:(?:static|abstract|deprecated)\s+)*)"
    r"(?:(?P<ctor>constructor)\((?P<cparams>.*)\)"
    r"|fun\s+(?P<fun>\w+)\((?P<fparams>.*)\)\s*:\s*(?P<ret>[\w.?<>]+)"
    r"|(?P<vk>val|const)\s+(?P<vname>\w+)\s*:\s*(?P<vtype>[\w.?<>]+)(?:\s*=.*)?)$"
)


def parse_api(text: str) -> tuple[dict[str, str], dict[str, ApiClass]]:
    """Header keys and classes by simple name (a nested class keeps its outer name: A.B)."""
    meta: dict[str, str] = {}
    classes: dict[str, ApiClass] = {}
    current: ApiClass | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line, _, comment = raw.partition("#")
        line = line.strip()
        if not line:
            continue
        if head := re.fullmatch(r"\[(class|interface)\s+([\w.]+)\]", line):
            fqn = head.group(2)
            simple = ".".join(p for p in fqn.split(".") if p[:1].isupper())
            current = classes[simple] = ApiClass(fqn, head.group(1))
        elif current is None and (kv := re.fullmatch(r"([\w-]+):\s*(.+)", line)):
            meta[kv.group(1)] = kv.group(2)
        elif current is not None and (m := _MEMBER.match(line)):
            mods = m.group("mods").split()
            if m.group("ctor"):
                member = Member("constructor", "constructor", split_top_level(m.group("cparams")), None)
            elif m.group("fun"):
                member = Member(m.group("fun"), "fun", split_top_level(m.group("fparams")), m.group("ret"))
            else:
                member = Member(m.group("vname"), m.group("vk"), [], m.group("vtype"))
            member.static = "static" in mods
            member.abstract = "abstract" in mods
            member.unconfirmed = "unconfirmed" in comment
            current.members.append(member)
        else:
            raise ValueError(f"{API_FILE.name}:{lineno}: cannot parse {raw!r}")
    return meta, classes


@pytest.fixture(scope="module")
def api():
    return parse_api(API_FILE.read_text())


# --- reading Kotlin ----------------------------------------------------------------------

def code_only(src: str) -> str:
    """Comments removed and string/char literal contents blanked; offsets and newlines kept."""
    out, i, n = list(src), 0, len(src)

    def blank(a: int, b: int) -> None:
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif src.startswith("/*", i):          # Kotlin block comments nest
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j)
            i = j
        elif src.startswith('"""', i):
            j = src.find('"""', i + 3)
            j = n if j < 0 else j + 3
            blank(i + 3, j - 3)
            i = j
        elif src[i] in "\"'":
            quote, j = src[i], i + 1
            while j < n and src[j] != quote:
                j += 2 if src[j] == "\\" else 1
            blank(i + 1, j)
            i = j + 1
        else:
            i += 1
    return "".join(out)


def close_of(code: str, open_at: int) -> int:
    """Index of the bracket closing the one at open_at."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(open_at, len(code)):
        if code[i] in pairs:
            stack.append(pairs[code[i]])
        elif stack and code[i] == stack[-1]:
            stack.pop()
            if not stack:
                return i
    raise ValueError(f"unbalanced bracket at offset {open_at}")


@dataclass(frozen=True)
class Use:
    file: str
    line: int
    cls: str             # simple (possibly nested) class name in the listing
    member: str          # "constructor" for constructor calls
    arity: int | None    # None for a property read
    how: str             # call | property | override


def param_type(param: str) -> str:
    """'prompt: String' -> 'String'; 'image: IntArray?' -> 'IntArray?'."""
    return param.split(":", 1)[1].strip() if ":" in param else param.strip()


def literal_type(arg: str, typed: dict[str, str]) -> str | None:
    """The type of an argument the reader can tell (literals, typed names), else None."""
    arg = arg.strip()
    if re.fullmatch(r'"\s*"', arg) or re.fullmatch(r'"""\s*"""', arg):   # literals are blanked
        return "String"
    if arg in ("true", "false"):
        return "Boolean"
    if arg == "null":
        return "null"
    if re.fullmatch(r"-?\d+", arg):
        return "Int"
    if re.fullmatch(r"-?\d+L", arg):
        return "Long"
    if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?[fF]", arg):
        return "Float"
    if re.fullmatch(r"-?(\d+\.\d*|\.\d+)([eE][-+]?\d+)?", arg):
        return "Double"
    if m := re.fullmatch(r"object\s*:\s*([\w.]+)[\s\S]*", arg):
        return m.group(1)
    return typed.get(arg)


def accepts(param: str, arg_type: str | None) -> bool:
    if arg_type is None:
        return True
    declared = param_type(param)
    if arg_type == "null":
        return declared.endswith("?")
    base = declared.rstrip("?")
    if base.startswith("java."):              # java.nio.ByteBuffer -> ByteBuffer
        base = base.rsplit(".", 1)[-1]
    if arg_type == "Int":                     # an integer literal also fits Long, Short, Byte
        return base in ("Int", "Long", "Short", "Byte")
    return base == arg_type


class KotlinApiChecker:
    """Finds every use of a listed class's members in Kotlin sources and checks it."""

    def __init__(self, classes: dict[str, ApiClass]):
        self.classes = classes
        self.by_fqn = {c.fqn for c in classes.values()}
        self.type_alt = "|".join(re.escape(c) for c in sorted(classes, key=len, reverse=True))
        self.uses: list[Use] = []
        self.problems: list[str] = []

    # -- one member use
    def resolve(self, cls: str, member: str, args: list[str] | None, at: tuple[str, int],
                how: str, typed: dict[str, str]) -> Member | None:
        where = f"{at[0]}:{at[1]}"
        self.uses.append(Use(at[0], at[1], cls, member, None if args is None else len(args), how))
        found = self.classes[cls].named(member)
        if args is not None:
            types = [literal_type(a, typed) for a in args]
            found = [m for m in found if m.kind in ("constructor", "fun") and len(m.params) == len(args)
                     and all(accepts(p, t) for p, t in zip(m.params, types))]
        if not found:
            listed = sorted({f"{m.name}/{len(m.params)}" for m in self.classes[cls].members})
            count = "a property read" if args is None else f"these {len(args)} argument(s)"
            self.problems.append(f"{where}: no {cls}.{member} in {API_FILE.name} takes {count} "
                                 f"(listed: {', '.join(listed)})")
            return None
        if all(m.unconfirmed for m in found):
            self.problems.append(f"{where}: {cls}.{member} is marked unconfirmed at the pinned version")
        return found[0]

    def follow_chain(self, code: str, pos: int, cls: str | None, loc, typed) -> None:
        """From pos, check each `.member(...)` / `.member` link while the receiver is listed."""
        while cls is not None:
            link = re.match(r"\s*(?:\?\.|!!\.|\.)\s*(\w+)\s*(\()?", code[pos:])
            if not link:
                return
            at = loc(pos + link.start(1))
            if link.group(2):
                paren = pos + link.start(2)
                args, pos = call_args(code, paren)
            else:
                args, pos = None, pos + link.end(1)
            member = self.resolve(cls, link.group(1), args, at, "call" if args is not None else "property", typed)
            returned = (member.returns or "").rstrip("?") if member else ""
            cls = returned if returned in self.classes else None

    # -- one file
    def check(self, fname: str, src: str) -> None:
        code = code_only(src)

        def loc(pos: int) -> tuple[str, int]:
            return fname, code.count("\n", 0, pos) + 1

        # Imports and fully qualified references must name listed classes.
        for m in re.finditer(r"\borg\.pytorch\.executorch(?:\.\w+)+", code):
            if m.group(0) not in self.by_fqn:
                self.problems.append(f"{fname}:{loc(m.start())[1]}: {m.group(0)} is not in {API_FILE.name}")

        # Names declared with a listed type: `val x: T`, `var x: T?`, parameters `x: T`.
        typed: dict[str, str] = {}
        for m in re.finditer(rf"(?:\bva[lr]\s+|[(,]\s*)(\w+)\s*:\s*({self.type_alt})\b(?![\w.])", code):
            if typed.setdefault(m.group(1), m.group(2)) != m.group(2):
                self.problems.append(f"{fname}:{loc(m.start())[1]}: {m.group(1)} names two ExecuTorch types")

        # An untyped declaration must not hold an ExecuTorch value: it would escape the check.
        held = "|".join([self.type_alt] + [re.escape(n) for n in typed])
        for m in re.finditer(r"\bva[lr]\s+(\w+)\s*=\s*([^\n]*)", code):
            if re.search(rf"(?<![\w.])(?:{held})\b", m.group(2)):
                self.problems.append(f"{fname}:{loc(m.start())[1]}: write the type of `{m.group(1)}` out "
                                     f"(it is initialised from an ExecuTorch value)")

        # Constructor calls `T(...)` and static members `T.member`, then any chain after them.
        for m in re.finditer(rf"(?<![\w.])({self.type_alt})\s*(\(|(?=\.\s*\w))", code):
            cls = m.group(1)
            if code[:m.start()].rstrip().endswith(":"):    # a type annotation, not an expression
                continue
            if m.group(2) == "(":
                args, end = call_args(code, m.start(2))
                self.resolve(cls, "constructor", args, loc(m.start()), "call", typed)
                self.follow_chain(code, end, cls, loc, typed)
            else:
                self.follow_chain(code, m.end(), cls, loc, typed)

        # Members reached through typed names: `x.member(...)`, `x?.member`.
        for name, cls in typed.items():
            for m in re.finditer(rf"(?<![\w.]){re.escape(name)}\b(?=\s*(?:\?\.|!!\.|\.))", code):
                self.follow_chain(code, m.end(), cls, loc, typed)

        # Implementations (`object : T {`, `class C(...) : T, U {`): overrides must be listed
        # with the same parameter types, and every abstract member must be overridden.
        headers = (r"\bobject(?:\s+\w+)?\s*:\s*([^{=]*?)\{",
                   r"\bclass\s+\w+\s*(?:<[^>]*>)?\s*(?:\w+\s+)?(?:constructor\s*)?"
                   r"(?:\((?:[^()]|\([^()]*\))*\))?\s*:\s*([^{=]*?)\{")
        for header in headers:
            for m in re.finditer(header, code):
                supertypes = [re.sub(r"\(.*", "", s).strip() for s in split_top_level(m.group(1))]
                for cls in (s for s in supertypes if s in self.classes):
                    self.check_overrides(code, m, cls, loc, typed)

    def check_overrides(self, code: str, header: re.Match, cls: str, loc, typed) -> None:
        body_open = header.end() - 1
        body = code[body_open:close_of(code, body_open) + 1]
        overridden = set()
        for o in re.finditer(r"\boverride\s+fun\s+(\w+)\s*\(", body):
            params = split_top_level(body[o.end():close_of(body, o.end() - 1)])
            declared = [param_type(p) for p in params]
            member = self.resolve(cls, o.group(1), [""] * len(params), loc(body_open + o.start()),
                                  "override", typed)
            if member and [t.rstrip("?") for t in declared] != [param_type(p).rstrip("?") for p in member.params]:
                self.problems.append(f"{loc(body_open + o.start())[0]}:{loc(body_open + o.start())[1]}: "
                                     f"{cls}.{o.group(1)}({', '.join(declared)}) does not match the listed "
                                     f"({', '.join(member.params)})")
            overridden.add(o.group(1))
        for member in self.classes[cls].members:
            if member.abstract and member.name not in overridden:
                self.problems.append(f"{loc(header.start())[0]}:{loc(header.start())[1]}: "
                                     f"{cls}.{member.name} is abstract and not overridden")


def call_args(code: str, paren_at: int) -> tuple[list[str], int]:
    """Arguments of the call whose '(' is at paren_at (a trailing lambda is one more), and
    the offset just past the call."""
    end = close_of(code, paren_at)
    args = split_top_level(code[paren_at + 1:end])
    rest = re.match(r"\s*\{", code[end + 1:])
    if rest:
        lam = end + rest.end()
        return args + [code[lam:close_of(code, lam) + 1]], close_of(code, lam) + 1
    return args, end + 1


def check_kotlin(files: dict[str, str], classes: dict[str, ApiClass]) -> tuple[list[Use], list[str]]:
    checker = KotlinApiChecker(classes)
    for fname, src in files.items():
        checker.check(fname, src)
    return checker.uses, checker.problems


def kotlin_sources() -> dict[str, str]:
    files = {str(p.relative_to(DEMO)): p.read_text() for p in sorted(KOTLIN_DIR.rglob("*.kt"))}
    assert files, f"no Kotlin sources under {KOTLIN_DIR}"
    return files


# --- (a) the Kotlin sources use only the published API -----------------------------------

def test_api_listing_names_the_pinned_release(api):
    meta, classes = api
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"]), meta
    assert meta["artifact"] == ARTIFACT
    assert f"executorch=={meta['version']}" in meta["exporter"]
    assert {"LlmModule", "LlmCallback", "LlmGenerationConfig", "LlmGenerationConfig.Builder"} <= set(classes)
    assert any(m.abstract for m in classes["LlmCallback"].members)


def test_kotlin_uses_only_listed_api_members(api):
    _, classes = api
    uses, problems = check_kotlin(kotlin_sources(), classes)
    assert not problems, "\n".join(problems)
    # The reader must actually have seen the app's ExecuTorch calls, or a pass means nothing.
    seen = {(u.cls, u.member, u.how) for u in uses}
    expected = {
        ("LlmModule", "constructor", "call"), ("LlmModule", "load", "call"),
        ("LlmModule", "generate", "call"), ("LlmModule", "resetContext", "call"),
        ("LlmModule", "stop", "call"), ("LlmModule", "close", "call"),
        ("LlmGenerationConfig", "create", "call"), ("LlmGenerationConfig.Builder", "build", "call"),
        ("LlmCallback", "onResult", "override"), ("LlmCallback", "onStats", "override"),
    }
    assert expected <= seen, sorted(expected - seen)


def test_only_chat_engine_touches_executorch():
    for name, src in kotlin_sources().items():
        if "org.pytorch.executorch" in code_only(src):
            assert name.endswith("ChatEngine.kt"), f"{name} imports ExecuTorch; keep it in ChatEngine.kt"


def test_checker_reports_wrong_arity_unknown_members_and_untyped_values(api):
    _, classes = api
    bad = """
        import org.pytorch.executorch.extension.llm.LlmModule
        import org.pytorch.executorch.extension.llm.LlmCallback
        import org.pytorch.executorch.extension.llm.LlmModel
        fun f(m: LlmModule, cb: LlmCallback) {
            val x = LlmModule("a", "b")                       // 2-argument constructor: none
            m.generate("p", cb, true, 1)                       // no 4-argument (String, cb, Boolean, Int)
            m.warmup()                                         // not a member
            val alias = m                                      // untyped ExecuTorch value
            val c: LlmCallback = object : LlmCallback {
                override fun onToken(t: String) {}             // not in LlmCallback; onResult missing
                override fun onError(code: Int, msg: String) {} // unconfirmed at the tag
            }
        }
    """
    _, problems = check_kotlin({"Bad.kt": bad}, classes)
    text = "\n".join(problems)
    for fragment in ("LlmModel is not in", "no LlmModule.constructor in", "takes these 2 argument(s)",
                     "no LlmModule.generate in", "takes these 4 argument(s)", "no LlmModule.warmup",
                     "type of `alias`", "type of `x`", "no LlmCallback.onToken",
                     "onResult is abstract", "onError is marked unconfirmed"):
        assert fragment in text, f"missing {fragment!r} in:\n{text}"


def test_checker_ignores_comments_and_strings_and_follows_builder_chains(api):
    _, classes = api
    src = '''
        // m.warmup() in a comment is not a call; nor is "LlmModule(1)" in a string
        /* LlmModule.nothing() /* nested */ still comment */
        fun g(m: LlmModule) {
            val s = "m.warmup() ${'$'}x"
            val c: LlmGenerationConfig = LlmGenerationConfig.create().echo(false)
                .seqLen(64).build()
            m.generate("p", c, object : LlmCallback { override fun onResult(result: String) {} })
        }
    '''
    uses, problems = check_kotlin({"Ok.kt": src}, classes)
    assert not problems, problems
    assert ("LlmGenerationConfig.Builder", "seqLen", 1) in {(u.cls, u.member, u.arity) for u in uses}
    assert ("LlmModule", "generate", 3) in {(u.cls, u.member, u.arity) for u in uses}


# --- (b) versions and SDK levels ---------------------------------------------------------

def test_gradle_pins_the_listed_executorch_android_release(api):
    meta, _ = api
    found = {}
    for path in list(DEMO.rglob("*.gradle.kts")) + list(DEMO.rglob("*.toml")):
        for m in re.finditer(rf'"{re.escape(ARTIFACT)}:([^"]+)"', path.read_text()):
            found.setdefault(m.group(1), []).append(str(path.relative_to(DEMO)))
    assert found == {meta["version"]: ["app/build.gradle.kts"]}, found


def test_exporter_and_android_runtime_are_the_same_release(api):
    meta, _ = api
    pin = re.search(r'"executorch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml no longer pins executorch exactly"
    assert pin.group(1) == meta["version"], (
        f"exporter executorch=={pin.group(1)} but the app pins {ARTIFACT}:{meta['version']}: "
        f"re-read the Android API at the new tag and update {API_FILE.name} and the Gradle pin")


def test_min_sdk_is_28_and_build_files_are_standard():
    app = (DEMO / "app" / "build.gradle.kts").read_text()
    assert re.findall(r"\bminSdk\s*=\s*(\d+)", app) == ["28"]
    settings = (DEMO / "settings.gradle.kts").read_text()
    assert "google()" in settings and "mavenCentral()" in settings and 'include(":app")' in settings
    wrapper = (DEMO / "gradle" / "wrapper" / "gradle-wrapper.properties").read_text()
    assert re.search(r"distributionUrl=.*gradle-[\d.]+-bin\.zip", wrapper)
    manifest = (DEMO / "app" / "src" / "main" / "AndroidManifest.xml").read_text()
    activity = re.search(r'android:name="\.(\w+)"', manifest).group(1)
    namespace = re.search(r'namespace\s*=\s*"([\w.]+)"', app).group(1)
    source = KOTLIN_DIR / Path(*namespace.split(".")) / f"{activity}.kt"
    assert re.search(rf"\bclass\s+{activity}\b", source.read_text()), source


def test_readme_states_the_pinned_versions(api):
    meta, _ = api
    readme = (DEMO / "README.md").read_text()
    assert f"{ARTIFACT}:{meta['version']}" in readme
    assert f"executorch=={meta['version']}" in readme


# --- (c) one prompt template per side ----------------------------------------------------

def kotlin_string_constant(src: str, name: str) -> str:
    m = re.search(rf'\bconst\s+val\s+{name}\s*=\s*"((?:[^"\\\n]|\\.)*)"', src)
    assert m, f"const val {name} = \"...\" not found"
    body = m.group(1)
    assert not re.search(r"(?<!\\)\$[\w{]", body), f"{name} uses a string template; it must be a constant"
    escapes = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "\\": "\\", '"': '"', "'": "'", "$": "$"}
    return re.sub(r"\\(u[0-9a-fA-F]{4}|.)",
                  lambda e: chr(int(e.group(1)[1:], 16)) if e.group(1)[0] == "u" else escapes[e.group(1)],
                  body)


def test_kotlin_prompt_template_equals_the_shared_file():
    src = (KOTLIN_DIR / "org" / "foldgpt" / "demo" / "PromptTemplate.kt").read_text()
    template = kotlin_string_constant(src, "TEMPLATE")
    placeholder = kotlin_string_constant(src, "PLACEHOLDER")
    shared = (DEMO / "prompt_template.txt").read_bytes().decode("utf-8")
    assert template == shared, (template, shared)
    assert placeholder == "{prompt}" and template.count(placeholder) == 1
    assert template == "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_template_is_spelled_in_one_kotlin_file():
    spelled = [name for name, src in kotlin_sources().items() if "<|im_start|>" in src]
    assert spelled == ["app/src/main/java/org/foldgpt/demo/PromptTemplate.kt"], spelled


def test_pte_identifier_check_matches_the_installed_exporter():
    src = (KOTLIN_DIR / "org" / "foldgpt" / "demo" / "ModelFiles.kt").read_text()
    prefix = kotlin_string_constant(src, "PTE_IDENTIFIER_PREFIX")
    spec = importlib.util.find_spec("executorch")       # finds the package without importing it
    assert spec is not None and spec.submodule_search_locations, "executorch is a dependency of foldgpt"
    fbs = Path(list(spec.submodule_search_locations)[0]) / "schema" / "program.fbs"
    assert fbs.exists(), f"{fbs} not shipped by this executorch build"
    identifier = re.search(r'file_identifier\s+"(\w{4})"', fbs.read_text()).group(1)
    assert identifier.startswith(prefix), (identifier, prefix)
