"""android_demo/ without an Android toolchain: version pins, SDK level, prompt template, identifiers.

The APK cannot be built on this machine (no Google Maven, no Android SDK), so these tests check
what the sources can show by themselves: the Gradle files pin org.pytorch:executorch-android to
the exporter's executorch release in pyproject.toml, minSdk is 28, the Kotlin prompt template
equals android_demo/prompt_template.txt (which the host twin reads), and the .pte identifier the
app checks is the installed exporter's. Whether the Kotlin calls match the library's API is not
tested here: only a compile against the AAR can show that (android_demo/README.md says how it
was checked by hand).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "android_demo"
KOTLIN_DIR = DEMO / "app" / "src" / "main" / "java"
ARTIFACT = "org.pytorch:executorch-android"


def kotlin_sources() -> dict[str, str]:
    files = {str(p.relative_to(DEMO)): p.read_text() for p in sorted(KOTLIN_DIR.rglob("*.kt"))}
    assert files, f"no Kotlin sources under {KOTLIN_DIR}"
    return files


def exporter_release() -> str:
    pin = re.search(r'"executorch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml no longer pins executorch exactly"
    return pin.group(1)


def test_only_chat_engine_imports_executorch():
    importers = [name for name, src in kotlin_sources().items()
                 if re.search(r"^\s*import\s+org\.pytorch\.executorch\b", src, re.M)]
    assert importers == ["app/src/main/java/org/foldgpt/demo/ChatEngine.kt"], importers


# --- (b) versions and SDK levels ---------------------------------------------------------

def test_gradle_pins_the_exporters_executorch_release():
    """A .pte is read by the runtime of the release that wrote it."""
    found = {}
    for path in list(DEMO.rglob("*.gradle.kts")) + list(DEMO.rglob("*.toml")):
        for m in re.finditer(rf'"{re.escape(ARTIFACT)}:([^"]+)"', path.read_text()):
            found.setdefault(m.group(1), []).append(str(path.relative_to(DEMO)))
    assert found == {exporter_release(): ["app/build.gradle.kts"]}, (
        f"the exporter is executorch=={exporter_release()}; the app pins {found}")


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


def test_readme_states_the_pinned_versions():
    readme, release = (DEMO / "README.md").read_text(), exporter_release()
    assert f"{ARTIFACT}:{release}" in readme
    assert f"executorch=={release}" in readme


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
