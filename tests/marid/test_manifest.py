from typing import Any

import pytest
import yaml

from marid import config, manifest, yamltext
from marid.manifest import (
    BuildArtifact,
    BuildJob,
    BuildStage,
    Job,
    ManifestLimits,
    Resources,
    Source,
)
from marid.validation import ValidationError

DOCKER = "driver:\n  type: docker\n  image: alpine\n  workspace: /w\n"
LIMITS = ManifestLimits.from_config(config.Config())  # the documented defaults

EXAMPLE = """\
namespace: acme/backend
driver:
  type: docker
  image: golang:1.21
  workspace: /go
env:
- CGO_ENABLED=0
objects:
- config.prod => conf/app.conf
sources:
- https://github.com/acme/api.git v2.1.0 => api
stages:
- lint
- test
- build
allow_failures:
- lint
jobs:
- stage: lint
  commands:
  - cd api && go vet ./...
- stage: test
  name: Unit Tests
  commands:
  - cd api && go test ./...
- stage: build
  commands:
  - cd api && go build -o ../app ./cmd/api
  artifacts:
  - app => api-server
"""


def errors(text: str, **kwargs: Any) -> dict[str, list[str]]:
    with pytest.raises(ValidationError) as info:
        manifest.parse(text, **kwargs)
    return info.value.errors


def bad(*messages: str) -> dict[str, list[str]]:
    return {"manifest": list(messages)}


# -- Rules 1-2 -------------------------------------------------------------------------------

# libyaml's wording differs from the pure-Python parser's; marid uses libyaml when present.
MAPPING_VALUES = (
    "mapping values are not allowed in this context"
    if yaml.__with_libyaml__
    else "mapping values are not allowed here"
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: b\n c: d\n", f"{MAPPING_VALUES} (line 2, column 3)"),
        ("a: 'open\n", "found unexpected end of stream (line 2, column 1)"),
        ("a: *nowhere\n", "found undefined alias nowhere (line 1, column 4)"),
        ("a: &x [*x]\n", "found undefined alias x (line 1, column 8)"),
        (DOCKER + "---\n" + DOCKER, "expected a single document in the stream (line 5, column 1)"),
        ("a: \x00\n", "unacceptable character #x0000: control characters are not allowed"),
        ("a: \ud800\n", "unacceptable character #xd800: surrogate"),
    ],
)
def test_invalid_yaml_is_one_line_with_its_position(text: str, message: str) -> None:
    if "#x0000" in message and not yaml.__with_libyaml__:
        message = message.replace("control", "special")
    assert errors(text) == bad(f"Manifest is not valid YAML: {message}")


@pytest.mark.parametrize("text", ["", "# nothing\n", "- a\n", "just text\n", "~\n", "'a: b'\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    assert errors(text) == bad("Manifest must be a YAML mapping")


def test_rules_1_and_2_stop_validation() -> None:
    assert errors("env: [1]\n- oops\n") == bad(
        "Manifest is not valid YAML: did not find expected key (line 2, column 1)"
        if yaml.__with_libyaml__
        else "Manifest is not valid YAML: expected <block end>, but found '-' (line 2, column 1)"
    )
    assert errors("[{driver: {type: nope}}]") == bad("Manifest must be a YAML mapping")


def test_a_yaml_bomb_is_refused_quickly() -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    assert errors("\n".join(lines)) == bad(
        "Manifest is too large: more than 50000 YAML nodes once aliases expand"
    )


@pytest.mark.parametrize("loader", ["SafeLoader", "CSafeLoader"])
def test_limits_read_the_same_with_either_yaml_parser(
    loader: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not hasattr(yaml, loader):
        pytest.skip("PyYAML built without libyaml")
    monkeypatch.setattr(yamltext, "_LOADER", getattr(yaml, loader))
    assert errors("a: " + "[" * 1_500) == bad("Manifest is too deeply nested: more than 64 levels")
    assert errors("a: " + "[" * 80 + "]" * 80) == bad(
        "Manifest is too deeply nested: more than 64 levels"
    )


def test_brackets_in_text_are_not_nesting() -> None:
    brackets = "[{" * 100
    text = (
        DOCKER
        + "stages: [s]\njobs:\n- stage: s\n  commands:\n"
        + f"  - echo '{brackets}' \"{brackets}\" # {brackets}\n"
        + f"  - test -f x{brackets}\n"
        + f"  - |\n    {brackets}\n    {brackets}\n"
        + f"env: [\"A={brackets}\", 'B={brackets}']\n"
    )
    assert len(manifest.parse(text).jobs) == 1


def test_too_many_aliases_are_refused_before_parsing() -> None:
    def aliases(count: int) -> str:
        return "x: &x a\ny: [" + ", ".join(["*x"] * count) + "]\n"

    assert errors(aliases(1001)) == bad("Manifest is too large: more than 1000 aliases")
    assert errors(aliases(1000)) == bad("Manifest invalid driver specified")


def test_small_aliases_are_expanded() -> None:
    text = (
        DOCKER + "stages: [s]\nx: &cmds [make, make test]\njobs:\n- {stage: s, commands: *cmds}\n"
    )
    assert manifest.parse(text).jobs[0].commands == ["make", "make test"]


def test_merge_keys_merge_mappings_and_own_keys_win() -> None:
    text = DOCKER + (
        "stages: [test]\n"
        "defaults: &defaults {stage: test, commands: [make], timeout: 5m}\n"
        "extra: &extra {artifacts: [out], commands: [never]}\n"
        "jobs:\n"
        "- {<<: *defaults, name: one}\n"
        "- <<: [*defaults, *extra]\n"
        "  commands: [make check]\n"
        "- {'<<': *defaults, stage: test, commands: [<<]}\n"
    )
    assert manifest.parse(text).jobs == [
        Job("test", "one", ["make"], [], 300),
        Job("test", "test.2", ["make check"], [("out", "out")], 300),
        Job("test", "test.3", ["<<"], [], None),  # a quoted '<<' is an ordinary key
    ]
    assert errors(DOCKER + "jobs: [{<<: [a]}]\n") == bad(
        "Manifest is not valid YAML: expected a mapping or list of mappings for merging"
        " (line 5, column 15)"
    )


def test_deep_nesting_and_huge_input_are_refused() -> None:
    # Refused by marid's own check on the text, before libyaml (whose limit is 1000 flow
    # levels, with its own words) reads past level 64.
    deep = bad("Manifest is too deeply nested: more than 64 levels")
    assert errors("a: " + "[" * 10_000) == deep
    assert errors("a: " + "{b: " * 2_000) == deep
    assert errors("".join(f"{'  ' * i}k{i}:\n" for i in range(200))) == deep
    assert errors("- " * 2_000 + "a") == deep
    assert errors("a: " + "[" * 65 + "]" * 65) == deep
    assert errors("a: " + "[" * 63 + "]" * 63) == bad("Manifest invalid driver specified")
    assert errors(DOCKER + "x: " + "y" * 1024**2) == bad(
        "Manifest is too large: more than 1048576 bytes"
    )


# -- Rule 3 ---------------------------------------------------------------------------------

TYPE_ERRORS = [
    ("namespace: [a]", "Manifest namespace must be a string"),
    ("namespace: {a: b}", "Manifest namespace must be a string"),
    ("env: A=b", "Manifest env must be a list of strings"),
    ("env: [[A=b]]", "Manifest env must be a list of strings"),
    ("objects: {a: b}", "Manifest objects must be a list of strings"),
    ("sources: [{a: b}]", "Manifest sources must be a list of strings"),
    ("stages: test", "Manifest stages must be a list of strings"),
    ("allow_failures: [[a]]", "Manifest allow_failures must be a list of strings"),
    ("jobs: {stage: a}", "Manifest jobs must be a list of mappings"),
    ("jobs: [a]", "Manifest jobs must be a list of mappings"),
    ("jobs: [{stage: [a]}]", "Manifest jobs[0].stage must be a string"),
    ("jobs: [{}, {name: {a: b}}]", "Manifest jobs[1].name must be a string"),
    ("jobs: [{commands: make}]", "Manifest jobs[0].commands must be a list of strings"),
    ("jobs: [{artifacts: [[a]]}]", "Manifest jobs[0].artifacts must be a list of strings"),
    ("jobs: [{timeout: [1m]}]", "Manifest jobs[0].timeout must be a string"),
    ("timeout: {m: 30}", "Manifest timeout must be a string"),
    ("resources: [memory]", "Manifest resources must be a mapping of strings"),
    ("resources: {cpus: [1]}", "Manifest resources must be a mapping of strings"),
]


@pytest.mark.parametrize(("field", "message"), TYPE_ERRORS)
def test_field_types(field: str, message: str) -> None:
    assert errors(DOCKER + field + "\n") == bad(message)


@pytest.mark.parametrize("driver", ["driver: docker", "driver: [a]", "driver: {type: [docker]}"])
def test_a_mistyped_driver_reports_only_its_type(driver: str) -> None:
    message = "Manifest driver must be a mapping of strings"
    assert errors(driver + "\n", drivers=["docker"]) == bad(message)


def test_mistyped_jobs_are_skipped_and_the_others_still_checked() -> None:
    text = DOCKER + "jobs:\n- oops\n- {stage: s, artifacts: ['']}\n"
    assert errors(text) == bad(
        "Manifest jobs must be a list of mappings",
        'Manifest jobs[1].artifacts entry "" is invalid',
    )


def test_scalars_are_kept_as_their_literal_text() -> None:
    text = """\
driver: {type: docker, image: 1.10, workspace: /w, extra: 010, flag: yes}
env: [VERSION=1.10]
stages: [1.10, on]
jobs:
- stage: 1.10
  name: yes
  commands: [010, 1.10, yes, on, 2024-01-01, 0x1F, 1e3, 12:30:00, '~']
- stage: on
  commands: [~, null]
"""
    parsed = manifest.parse(text)
    assert parsed.driver.config == {
        "type": "docker",
        "image": "1.10",
        "workspace": "/w",
        "extra": "010",
        "flag": "yes",
    }
    assert parsed.stages == ["1.10", "on"]
    assert parsed.jobs[0] == Job(
        "1.10",
        "yes",
        ["010", "1.10", "yes", "on", "2024-01-01", "0x1F", "1e3", "12:30:00", "~"],
        [],
        None,
    )
    assert parsed.jobs[1].commands == ["", ""]  # a null list item reads as ""


def test_null_fields_are_absent() -> None:
    parsed = manifest.parse(DOCKER + "namespace: ~\nenv:\nstages: null\njobs:\ntimeout:\n")
    assert (parsed.namespace, parsed.env, parsed.stages, parsed.jobs) == (None, [], [], [])
    assert parsed.timeout == 1800


def test_unknown_keys_are_ignored() -> None:
    text = DOCKER + "image: [x]\njobs:\n- {stage: a, when: {x: [1]}}\nstages: [a]\n"
    assert [job.name for job in manifest.plan(manifest.parse(text), 1).jobs] == [
        "create-driver",
        "a.1",
    ]


# -- Rules 4-9 ------------------------------------------------------------------------------

DRIVER_ERRORS = [
    ("stages: [a]", ["Manifest invalid driver specified"]),
    ("driver: {}", ["Manifest invalid driver specified"]),
    ("driver: {image: alpine}", ["Manifest invalid driver specified"]),
    ("driver: {type: Docker}", ["Manifest invalid driver specified Docker"]),
    ("driver: {type: 1.5}", ["Manifest invalid driver specified 1.5"]),
    (
        "driver: {type: docker}",
        ["Manifest driver docker requires image", "Manifest driver docker requires workspace"],
    ),
    ("driver: {type: docker, workspace: /w}", ["Manifest driver docker requires image"]),
    (
        "driver: {type: docker, image: a, workspace: ''}",
        ["Manifest driver docker requires workspace"],
    ),
    (
        "driver: {type: docker, image: a, workspace: w}",
        ["Manifest driver docker workspace must be an absolute path"],
    ),
    (
        "driver: {type: docker, image: ~, workspace: w}",
        [
            "Manifest driver docker requires image",
            "Manifest driver docker workspace must be an absolute path",
        ],
    ),
    ("driver: {type: qemu, arch: arm64}", ["Manifest driver qemu requires image"]),
    ("driver: {type: ssh, image: a}", ["Manifest driver ssh requires address"]),
]


@pytest.mark.parametrize(("text", "messages"), DRIVER_ERRORS)
def test_driver_rules(text: str, messages: list[str]) -> None:
    assert errors(text + "\n") == bad(*messages)


@pytest.mark.parametrize(
    "driver",
    [
        "{type: docker, image: golang:1.21, workspace: /go}",
        "{type: qemu, image: debian/stable}",
        "{type: ssh, address: 127.0.0.1:22}",
        "{type: os}",
    ],
)
def test_a_manifest_with_only_a_valid_driver_is_valid(driver: str) -> None:
    parsed = manifest.parse(f"driver: {driver}\n")
    assert (parsed.env, parsed.objects, parsed.sources, parsed.stages, parsed.jobs) == (
        [],
        [],
        [],
        [],
        [],
    )
    assert [stage.name for stage in manifest.plan(parsed, 3).stages] == ["setup - #3"]


def test_driver_keeps_every_key() -> None:
    parsed = manifest.parse("driver: {type: qemu, image: debian/stable, arch: arm64}\n")
    assert parsed.driver == manifest.Driver(
        "qemu", {"type": "qemu", "image": "debian/stable", "arch": "arm64"}
    )


# -- Rules 10-13 ----------------------------------------------------------------------------


def test_env_entries() -> None:
    text = DOCKER + "env: [A=1, 'B=x = y ', C=, '=v', D, '']\n"
    assert errors(text) == bad(
        'Manifest env entry "=v" must be in the form KEY=VALUE',
        'Manifest env entry "D" must be in the form KEY=VALUE',
        'Manifest env entry "" must be in the form KEY=VALUE',
    )
    parsed = manifest.parse(DOCKER + "env: [A=1, 'B=x = y ', C=, A=2]\n")
    assert parsed.env == [("A", "1"), ("B", "x = y "), ("C", ""), ("A", "2")]


def test_objects_entries() -> None:
    text = DOCKER + "objects: ['', ' => x', 'a =>', '=>', '/', ok]\n"
    assert errors(text) == bad(
        'Manifest objects entry "" is invalid',
        'Manifest objects entry " => x" is invalid',
        'Manifest objects entry "a =>" is invalid',
        'Manifest objects entry "=>" is invalid',
        'Manifest objects entry "/" is invalid',
    )


@pytest.mark.parametrize(
    ("entry", "pair"),
    [
        ("djinn/bin/djinn", ("djinn/bin/djinn", "djinn")),
        ("/etc/os-release", ("/etc/os-release", "os-release")),
        ("build/out/", ("build/out/", "out")),
        ("config.prod => conf/app.conf", ("config.prod", "conf/app.conf")),
        ("  a b  =>  c d  ", ("a b", "c d")),
        ("a => b => c", ("a", "b => c")),
        ("a=>b", ("a", "b")),
    ],
)
def test_arrow_notation(entry: str, pair: tuple[str, str]) -> None:
    assert manifest.split_arrow(entry) == pair


def test_the_same_source_twice_keeps_the_later_entry() -> None:
    text = DOCKER + "objects: [a => one, b, a => two]\n"
    assert manifest.parse(text).objects == [("b", "b"), ("a", "two")]


@pytest.mark.parametrize(
    ("entry", "source"),
    [
        ("https://github.com/git/git", Source("https://github.com/git/git", None, "git")),
        (
            "https://github.com/git/git v1.2.3",
            Source("https://github.com/git/git", "v1.2.3", "git"),
        ),
        (
            "https://github.com/git/git v1.2.3 => git-v1.2.3",
            Source("https://github.com/git/git", "v1.2.3", "git-v1.2.3"),
        ),
        ("git@github.com:me/app.git => src", Source("git@github.com:me/app.git", None, "src")),
        ("git@github.com:me/app.git", Source("git@github.com:me/app.git", None, "app")),
        ("https://h/r.git  main  =>  d ", Source("https://h/r.git", "main", "d")),
        ("https://h/r.git =>", Source("https://h/r.git", None, "r")),
        ("https://h/repo/", Source("https://h/repo/", None, "repo")),
    ],
)
def test_sources_table(entry: str, source: Source) -> None:
    assert manifest.split_source(entry) == source
    assert manifest.parse(DOCKER + f"sources: ['{entry}']\n").sources == [source]


def test_sources_entries_need_a_url() -> None:
    text = DOCKER + "sources: ['', ' https://h/r', 'https://h/r']\n"
    assert errors(text) == bad(
        'Manifest sources entry "" is invalid',
        'Manifest sources entry " https://h/r" is invalid',
    )


def test_artifacts_entries() -> None:
    text = DOCKER + "jobs:\n- artifacts: [ok]\n- artifacts: [out =>, '']\n"
    assert errors(text) == bad(
        'Manifest jobs[1].artifacts entry "out =>" is invalid',
        'Manifest jobs[1].artifacts entry "" is invalid',
    )


# -- Rule 14 and job names ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "normalised"),
    [
        ("Unit Tests", "unit-tests"),
        ("  --Foo__Bar!!  ", "foo-bar"),
        ("v1.2 (linux/amd64)", "v1.2-linux-amd64"),
        ("Émile", "mile"),
        ("!!!", ""),
    ],
)
def test_job_name_normalisation(name: str, normalised: str) -> None:
    assert manifest.job_name(name) == normalised


def test_default_job_names_count_jobs_per_stage() -> None:
    text = DOCKER + (
        "stages: [Build, test]\njobs:\n"
        "- stage: Build\n- stage: test\n- stage: Build\n  name: '!!'\n- stage: Build\n"
        "- stage: test\n  name: ' Unit Tests '\n"
    )
    names = [job.name for job in manifest.parse(text).jobs]
    assert names == ["build.1", "test.1", "build.2", "build.3", "unit-tests"]


DUPLICATES = [
    ("- {stage: a, name: Unit Tests}\n- {stage: a, name: unit-tests}\n", ["unit-tests"]),
    ("- {stage: a, name: Create Driver}\n", ["create-driver"]),
    ("- {stage: a, name: CLONE.0}\n", ["clone.0"]),
    ("- {stage: a}\n- {stage: a, name: a.1}\n- {stage: a, name: A.1}\n", ["a.1"]),
    (  # reported in execution order: stage a runs first
        "- {stage: b, name: y}\n- {stage: b, name: x}\n- {stage: a, name: x}\n"
        "- {stage: a, name: y}\n",
        ["y", "x"],
    ),
]


@pytest.mark.parametrize(("jobs", "names"), DUPLICATES)
def test_duplicate_job_names(jobs: str, names: list[str]) -> None:
    text = DOCKER + "sources: [https://h/r]\nstages: [a, b]\njobs:\n" + jobs
    assert errors(text) == bad(*(f"Manifest duplicate job name {name}" for name in names))


def test_jobs_outside_the_build_do_not_count_as_duplicates() -> None:
    text = DOCKER + (
        "stages: [a]\njobs:\n- {name: create-driver}\n- {stage: b, name: create-driver}\n"
    )
    assert [job.name for job in manifest.plan(manifest.parse(text), 1).jobs] == ["create-driver"]


# -- Rule 16 (EXT h.1) ----------------------------------------------------------------------

LIMIT_ERRORS = [
    ("timeout: 30", "Manifest timeout must be a duration such as 30m or 1h30m"),
    ("timeout: 0s", "Manifest timeout must be a duration such as 30m or 1h30m"),
    ("timeout: 1h 30m", "Manifest timeout must be a duration such as 30m or 1h30m"),
    ("timeout: 3h", "Manifest timeout exceeds the maximum of 2h"),
    ("timeout: 7201s", "Manifest timeout exceeds the maximum of 2h"),
    ("resources: {memory: 512x}", "Manifest resources.memory must be a size such as 512m or 2g"),
    ("resources: {memory: 5m}", "Manifest resources.memory must be a size such as 512m or 2g"),
    ("resources: {memory: 6143k}", "Manifest resources.memory must be a size such as 512m or 2g"),
    ("resources: {memory: 5g}", "Manifest resources.memory exceeds the maximum of 4g"),
    ("resources: {memory: 4097m}", "Manifest resources.memory exceeds the maximum of 4g"),
    ("resources: {cpus: 0}", "Manifest resources.cpus must be a positive number"),
    ("resources: {cpus: 0.00}", "Manifest resources.cpus must be a positive number"),
    ("resources: {cpus: -1}", "Manifest resources.cpus must be a positive number"),
    ("resources: {cpus: 1.234}", "Manifest resources.cpus must be a positive number"),
    ("resources: {cpus: one}", "Manifest resources.cpus must be a positive number"),
    ("resources: {cpus: 2.01}", "Manifest resources.cpus exceeds the maximum of 2"),
    ("resources: {pids: 0}", "Manifest resources.pids must be a positive integer"),
    ("resources: {pids: 1.5}", "Manifest resources.pids must be a positive integer"),
    ("resources: {pids: 4097}", "Manifest resources.pids exceeds the maximum of 4096"),
    ("jobs: [{timeout: 10}]", "Manifest jobs[0].timeout must be a duration such as 30m or 1h30m"),
    ("jobs: [{timeout: 31m}]", "Manifest jobs[0].timeout exceeds the build timeout of 30m"),
    (
        "timeout: 1h30m\njobs: [{}, {timeout: 2h}]",
        "Manifest jobs[1].timeout exceeds the build timeout of 1h30m",
    ),
    (
        "timeout: 90m\njobs: [{timeout: 1h31m}]",
        "Manifest jobs[0].timeout exceeds the build timeout of 90m",
    ),
]


@pytest.mark.parametrize(("field", "message"), LIMIT_ERRORS)
def test_time_and_resource_limits(field: str, message: str) -> None:
    assert errors(DOCKER + field + "\n", limits=LIMITS) == bad(message)


def test_limits_within_the_caps() -> None:
    text = DOCKER + (
        "timeout: 2h\nresources: {memory: 4g, cpus: 0.25, pids: 010}\n"
        "stages: [s]\njobs:\n- {stage: s, timeout: 1h59m60s}\n- {stage: s}\n"
    )
    parsed = manifest.parse(text, LIMITS)
    assert parsed.timeout == 7200
    assert parsed.resources == Resources(memory=4 * 1024**3, cpus=0.25, pids=10)
    assert [job.timeout for job in parsed.jobs] == [7200, None]
    assert [job.timeout for job in manifest.plan(parsed, 1).jobs] == [None, 7200, None]


def test_defaults_come_from_the_limits() -> None:
    limits = ManifestLimits(600, 900, 256 * 1024**2, 1024**3, 0.5, 1, 64, 128)
    parsed = manifest.parse(DOCKER + "resources: {pids: 100}\n", limits)
    assert parsed.timeout == 600
    assert parsed.resources == Resources(memory=256 * 1024**2, cpus=0.5, pids=100)


def test_caps_come_from_a_config() -> None:
    cfg = config.from_dict(
        {
            "builds": {"timeout": "20m", "max_timeout": "90m"},
            "limits": {
                "default": {"memory": "1g", "cpus": 0.5, "pids": 10},
                "max": {"memory": "1536m", "cpus": 1.5, "pids": 100},
            },
        },
        optional=("server.url", "database.dsn", "crypto.key"),
    )
    limits = ManifestLimits.from_config(cfg)
    assert manifest.parse(DOCKER, limits).resources == Resources(1024**3, 0.5, 10)
    text = DOCKER + (
        "timeout: 91m\nresources: {memory: 2g, cpus: 1.75, pids: 101}\njobs: [{timeout: 92m}]\n"
    )
    assert errors(text, limits=limits) == bad(
        "Manifest timeout exceeds the maximum of 1h30m",
        "Manifest resources.memory exceeds the maximum of 1536m",
        "Manifest resources.cpus exceeds the maximum of 1.5",
        "Manifest resources.pids exceeds the maximum of 100",
        "Manifest jobs[0].timeout exceeds the build timeout of 91m",
    )
    assert errors(DOCKER + "jobs: [{timeout: 21m}]\n", limits=limits) == bad(
        "Manifest jobs[0].timeout exceeds the build timeout of 20m"
    )


def test_without_limits_there_are_no_caps_but_formats_are_checked() -> None:
    text = DOCKER + "timeout: 100h\nresources: {memory: 64g, cpus: 64, pids: 100000}\n"
    parsed = manifest.parse(text)
    assert parsed.timeout == 360000
    assert parsed.resources == Resources(64 * 1024**3, 64.0, 100000)
    assert manifest.parse(DOCKER).resources == Resources(2 * 1024**3, 1.0, 1024)
    assert errors(DOCKER + "resources: {memory: 1k}\n") == bad(
        "Manifest resources.memory must be a size such as 512m or 2g"
    )


@pytest.mark.parametrize(
    ("size", "shown"), [(4 * 1024**3, "4g"), (1536 * 1024**2, "1536m"), (1000, "1000"), (0, "0")]
)
def test_format_size(size: int, shown: str) -> None:
    assert manifest.format_size(size) == shown


@pytest.mark.parametrize(
    ("seconds", "shown"), [(7200, "2h"), (5400, "1h30m"), (90, "1m30s"), (3661, "1h1m1s")]
)
def test_format_duration(seconds: float, shown: str) -> None:
    assert manifest.format_duration(seconds) == shown


# -- Rule 17 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("driver", "drivers", "shown"),
    [
        ("{type: qemu, image: debian/stable}", ["docker"], "qemu-x86_64"),
        ("{type: os}", ["docker", "qemu"], "os"),
        ("{type: docker, image: a, workspace: /w}", [], "docker"),
        ("{type: ssh, address: 127.0.0.1:22}", ["docker"], "ssh"),
    ],
)
def test_disabled_drivers(driver: str, drivers: list[str], shown: str) -> None:
    text = f"driver: {driver}\n"
    assert errors(text, drivers=drivers) == bad(f"Manifest driver error: {shown} - driver disabled")
    kind = manifest.parse(text).driver.type  # not checked without `drivers` (/cron, marid run)
    manifest.parse(text, drivers=[*drivers, kind])


def test_an_invalid_driver_is_not_also_reported_disabled() -> None:
    assert errors("driver: {type: lxc}\n", drivers=["docker"]) == bad(
        "Manifest invalid driver specified lxc"
    )


# -- Accumulation and order -----------------------------------------------------------------


def test_errors_accumulate_in_rule_order() -> None:
    text = """\
timeout: 5h
jobs:
- stage: a
  name: x
  artifacts: ['']
  timeout: 1d
- stage: a
  name: X
resources: {pids: none}
stages: [a]
sources: ['']
objects: ['=>']
env: [NOPE]
driver:
  type: docker
  workspace: relative
namespace: [a]
"""
    assert errors(text, limits=LIMITS, drivers=[]) == bad(
        "Manifest namespace must be a string",
        "Manifest driver docker requires image",
        "Manifest driver docker workspace must be an absolute path",
        'Manifest env entry "NOPE" must be in the form KEY=VALUE',
        'Manifest objects entry "=>" is invalid',
        'Manifest sources entry "" is invalid',
        'Manifest jobs[0].artifacts entry "" is invalid',
        "Manifest duplicate job name x",
        "Manifest timeout exceeds the maximum of 2h",
        "Manifest resources.pids must be a positive integer",
        "Manifest jobs[0].timeout must be a duration such as 30m or 1h30m",
        "Manifest driver error: docker - driver disabled",
    )


def test_type_errors_come_first_in_field_order() -> None:
    text = "jobs: [{stage: [a]}]\nenv: x\nresources: []\ndriver: {type: x}\nstages: {}\n"
    assert errors(text) == bad(
        "Manifest env must be a list of strings",
        "Manifest stages must be a list of strings",
        "Manifest jobs[0].stage must be a string",
        "Manifest resources must be a mapping of strings",
        "Manifest invalid driver specified x",
    )


# -- Plan -----------------------------------------------------------------------------------


def test_the_example_manifest() -> None:
    parsed = manifest.parse(EXAMPLE, LIMITS, ["docker"])
    assert parsed.namespace == "acme/backend"
    assert parsed.driver.config == {"type": "docker", "image": "golang:1.21", "workspace": "/go"}
    assert parsed.env == [("CGO_ENABLED", "0")]
    assert parsed.objects == [("config.prod", "conf/app.conf")]
    assert parsed.sources == [Source("https://github.com/acme/api.git", "v2.1.0", "api")]
    assert parsed.allow_failures == ["lint"]
    assert parsed.text == EXAMPLE
    built = manifest.plan(parsed, 7)
    assert built.stages == [
        BuildStage(
            "setup - #7",
            False,
            [
                BuildJob("create-driver", ""),
                BuildJob(
                    "clone.0",
                    "mkdir -p api\ngit clone -q https://github.com/acme/api.git api\n"
                    "cd api\ngit checkout -q v2.1.0",
                ),
            ],
        ),
        BuildStage("lint", True, [BuildJob("lint.1", "cd api && go vet ./...")]),
        BuildStage("test", False, [BuildJob("unit-tests", "cd api && go test ./...")]),
        BuildStage(
            "build",
            False,
            [
                BuildJob(
                    "build.1", "cd api && go build -o ../app ./cmd/api", [("app", "api-server")]
                )
            ],
        ),
    ]
    assert [job.name for job in built.jobs] == [
        "create-driver",
        "clone.0",
        "lint.1",
        "unit-tests",
        "build.1",
    ]
    assert built.artifacts == [BuildArtifact("api-server", "app", "build.1")]


def test_clone_without_a_ref() -> None:
    parsed = manifest.parse(DOCKER + "sources: [https://h/a.git, https://h/b => c]\n")
    assert manifest.plan(parsed, 1).stages[0].jobs[1:] == [
        BuildJob("clone.0", "mkdir -p a\ngit clone -q https://h/a.git a"),
        BuildJob("clone.1", "mkdir -p c\ngit clone -q https://h/b c"),
    ]


def test_plan_stages_follow_the_stages_list() -> None:
    text = DOCKER + (
        "stages: [Build, test, Build, empty]\nallow_failures: [test, nope, 'setup - #2']\njobs:\n"
        "- {stage: test, commands: [a, b]}\n- {stage: Build}\n- {stage: Build}\n"
        "- {stage: Build}\n- {stage: missing}\n- {commands: [c]}\n"
    )
    built = manifest.plan(manifest.parse(text), 2)
    assert [(stage.name, stage.allow_failures) for stage in built.stages] == [
        ("setup - #2", False),
        ("Build", False),
        ("test", True),
        ("empty", False),
    ]
    assert [job.name for job in built.jobs] == [
        "create-driver",
        "build.1",
        "build.2",
        "build.3",
        "test.1",
    ]
    assert built.stages[2].jobs == [BuildJob("test.1", "a\nb")]


def test_artifact_records_come_from_the_first_declaring_job() -> None:
    text = DOCKER + (
        "stages: [one, two]\njobs:\n"
        "- {stage: two, artifacts: [late => out, bin/tool]}\n"
        "- {stage: one, artifacts: [early => out, dist/ => pkg, x => pkg]}\n"
        "- {stage: skipped, artifacts: [never]}\n"
    )
    parsed = manifest.parse(text)
    assert parsed.jobs[1].artifacts == [("early", "out"), ("dist/", "pkg"), ("x", "pkg")]
    assert manifest.plan(parsed, 1).artifacts == [
        BuildArtifact("out", "early", "one.1"),
        BuildArtifact("pkg", "dist/", "one.1"),
        BuildArtifact("tool", "bin/tool", "two.1"),
    ]


def test_job_script() -> None:
    assert manifest.script(["make", "make test"]) == (
        "#!/bin/sh\nexec 2>&1\nset -ex\n\nmake\nmake test\n"
    )
    assert manifest.script([]) == "#!/bin/sh\nexec 2>&1\nset -ex\n\n"


def test_the_caller_puts_namespace_messages_after_rule_14() -> None:
    text = "namespace: a b\ndriver: {type: docker, image: a}\nenv: [x]\ntimeout: x\n"
    with pytest.raises(manifest.ManifestError) as info:
        manifest.parse(text, LIMITS, [])
    assert info.value.namespace == "a b"
    namespace = "Manifest namespace name can only contain letters and numbers"
    assert info.value.with_namespace([namespace]).errors == bad(
        "Manifest driver docker requires workspace",
        'Manifest env entry "x" must be in the form KEY=VALUE',
        namespace,
        "Manifest timeout must be a duration such as 30m or 1h30m",
        "Manifest driver error: docker - driver disabled",
    )
    with pytest.raises(manifest.ManifestError) as info:
        manifest.parse("- a\n")
    assert info.value.namespace is None
