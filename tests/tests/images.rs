//! The container images' recipe, `deploy/docker/Dockerfile`, against what it must agree with:
//! the project's build command (release, `--locked`), `rust-toolchain.toml`, the workspace's bin
//! targets, and the Helm chart's values (the user it runs as, the ports it probes). No image is
//! built here: this reads the Dockerfile the way `docker build` does (stages, continuation
//! lines, comments) and checks each final target, following the stages it is built `FROM`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

/// The images: their target, the binaries they carry (the entrypoint first), the chart's
/// values path of the port their HEALTHCHECK probes, and the chart's ports they expose.
const IMAGES: &[Image] = &[
    Image {
        target: "control-plane",
        binaries: &["sluice-cp", "sluicectl"],
        ports: &["controlPlane", "ports"],
        health_port: "http",
    },
    Image {
        target: "data-plane",
        binaries: &["sluice-dp"],
        ports: &["dataPlane", "ports"],
        health_port: "admin",
    },
];

/// What a runtime stage must not install: compilers, build systems, the Rust toolchain.
/// Packages ending in `-dev` are refused too.
const BUILD_TOOLS: &[&str] = &[
    "build-essential",
    "gcc",
    "g++",
    "cc",
    "clang",
    "make",
    "cmake",
    "pkg-config",
    "binutils",
    "libc6-dev",
    "cargo",
    "rustc",
    "rustup",
];

#[derive(Debug)]
struct Image {
    target: &'static str,
    binaries: &'static [&'static str],
    ports: &'static [&'static str],
    health_port: &'static str,
}

#[test]
fn every_cargo_build_is_release_and_locked() {
    let dockerfile = Dockerfile::load();
    let builds: Vec<&Instruction> = dockerfile
        .instructions()
        .filter(|i| i.keyword == "RUN" && i.args.contains("cargo build"))
        .collect();
    assert!(!builds.is_empty(), "no `cargo build` in the Dockerfile");
    for build in builds {
        for flag in ["--release", "--locked"] {
            assert!(
                build.args.split_whitespace().any(|word| word == flag),
                "line {}: a cargo build without {flag}: {}",
                build.line,
                build.args
            );
        }
    }
}

#[test]
fn the_builder_uses_the_pinned_toolchain() {
    let toolchain = std::fs::read_to_string(root().join("rust-toolchain.toml")).unwrap();
    let channel = toolchain
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once('=')?;
            (key.trim() == "channel").then(|| value.trim().trim_matches('"').to_owned())
        })
        .expect("rust-toolchain.toml has a channel");
    let dockerfile = Dockerfile::load();
    let rust_images: Vec<&str> = dockerfile
        .stages
        .iter()
        .map(|stage| stage.base.as_str())
        .filter(|base| is_rust_image(base))
        .collect();
    assert!(!rust_images.is_empty(), "no stage builds FROM a rust image");
    for image in rust_images {
        let tag = image.split_once(':').map_or("", |(_, tag)| tag);
        assert!(
            tag == channel || tag.starts_with(&format!("{channel}-")),
            "FROM {image}: rust-toolchain.toml pins {channel}"
        );
    }
}

#[test]
fn images_carry_workspace_binaries_built_by_their_build_stage() {
    let dockerfile = Dockerfile::load();
    let workspace_bins = workspace_bins();
    for image in IMAGES {
        let chain = dockerfile.chain(image.target);
        let mut copied = BTreeSet::new();
        for copy in instructions(&chain).filter(|i| i.keyword == "COPY") {
            let words: Vec<&str> = copy.args.split_whitespace().collect();
            let Some(from) = words.iter().find_map(|w| w.strip_prefix("--from=")) else {
                continue;
            };
            let sources = &words[..words.len() - 1];
            for source in sources.iter().filter(|w| !w.starts_with("--")) {
                let name = source.rsplit('/').next().unwrap();
                assert!(
                    workspace_bins.contains(name),
                    "{}: line {} copies {source}, which is no bin target of the workspace {workspace_bins:?}",
                    image.target,
                    copy.line
                );
                let built = instructions(&dockerfile.chain(from)).any(|i| {
                    let words: Vec<&str> = i.args.split_whitespace().collect();
                    i.keyword == "RUN"
                        && i.args.contains("cargo build")
                        && (words.windows(2).any(|w| w == ["--bin", name])
                            || words.contains(&format!("--bin={name}").as_str()))
                });
                assert!(
                    built,
                    "{}: {name} is copied from stage {from}, where no cargo build names --bin {name}",
                    image.target
                );
                copied.insert(name.to_owned());
            }
        }
        let expected: BTreeSet<String> = image.binaries.iter().map(|b| b.to_string()).collect();
        assert_eq!(copied, expected, "{}: binaries in the image", image.target);

        // The chart gives only arguments: the entrypoint must be the binary itself.
        let entrypoint = last(&chain, "ENTRYPOINT").expect("an ENTRYPOINT");
        let entrypoint: Vec<String> = serde_json::from_str(&entrypoint.args)
            .unwrap_or_else(|e| panic!("{}: ENTRYPOINT in exec form: {e}", image.target));
        assert_eq!(
            entrypoint.first().map(|e| e.rsplit('/').next().unwrap()),
            Some(image.binaries[0]),
            "{}: ENTRYPOINT",
            image.target
        );
    }
}

#[test]
fn runtime_images_run_as_the_charts_user_without_build_tools() {
    let values = chart_values();
    let security = &values["podSecurityContext"];
    let uid = security["runAsUser"]
        .as_u64()
        .expect("podSecurityContext.runAsUser");
    let gid = security["runAsGroup"].as_u64();
    assert_ne!(uid, 0, "the chart runs as root");
    let dockerfile = Dockerfile::load();
    for image in IMAGES {
        let chain = dockerfile.chain(image.target);
        let user = last(&chain, "USER").expect("a USER");
        let (user_id, group_id) = match user.args.split_once(':') {
            Some((user, group)) => (user, Some(group)),
            None => (user.args.as_str(), None),
        };
        assert_eq!(
            user_id.parse::<u64>().ok(),
            Some(uid),
            "{}: USER {} is not the chart's runAsUser {uid} as a number",
            image.target,
            user.args
        );
        if let (Some(group_id), Some(gid)) = (group_id, gid) {
            assert_eq!(
                group_id.parse::<u64>().ok(),
                Some(gid),
                "{}: USER {} is not the chart's runAsGroup {gid}",
                image.target,
                user.args
            );
        }

        let base = &chain.last().unwrap().base;
        assert!(
            !is_rust_image(base) && !base.starts_with("buildpack-deps"),
            "{}: the runtime is built FROM {base}, a build image",
            image.target
        );
        for run in instructions(&chain).filter(|i| i.keyword == "RUN") {
            for command in run.args.split(['&', ';', '|']) {
                let words: Vec<&str> = command.split_whitespace().collect();
                assert!(
                    !words
                        .first()
                        .is_some_and(|w| ["cargo", "rustc", "rustup"].contains(w)),
                    "{}: line {} runs the Rust toolchain in a runtime stage",
                    image.target,
                    run.line
                );
                let Some(at) = words
                    .windows(2)
                    .position(|w| matches!(w, ["apt-get" | "apt", "install"] | ["apk", "add"]))
                else {
                    continue;
                };
                for package in words[at + 2..].iter().filter(|w| !w.starts_with('-')) {
                    let name = package.split('=').next().unwrap();
                    assert!(
                        !BUILD_TOOLS.contains(&name) && !name.ends_with("-dev"),
                        "{}: line {} installs {name}, a build tool, in a runtime stage",
                        image.target,
                        run.line
                    );
                }
            }
        }
    }
}

#[test]
fn health_checks_probe_healthz_on_the_charts_ports() {
    let values = chart_values();
    let dockerfile = Dockerfile::load();
    for image in IMAGES {
        let chain = dockerfile.chain(image.target);
        let ports = image.ports.iter().fold(&values, |v, key| &v[*key]);
        let port = ports[image.health_port]
            .as_u64()
            .unwrap_or_else(|| panic!("values: {}.{}", image.ports.join("."), image.health_port));
        let check = last(&chain, "HEALTHCHECK").expect("a HEALTHCHECK");
        assert!(
            check.args.contains("/healthz"),
            "{}: HEALTHCHECK does not ask /healthz: {}",
            image.target,
            check.args
        );
        assert!(
            mentions_port(&check.args, port),
            "{}: HEALTHCHECK does not probe port {port} ({}.{}): {}",
            image.target,
            image.ports.join("."),
            image.health_port,
            check.args
        );

        let exposed: BTreeSet<u64> = instructions(&chain)
            .filter(|i| i.keyword == "EXPOSE")
            .flat_map(|i| i.args.split_whitespace())
            .map(|p| p.split('/').next().unwrap().parse().unwrap())
            .collect();
        let chart_ports: BTreeSet<u64> = ports
            .as_mapping()
            .expect("a map of ports")
            .values()
            .map(|p| p.as_u64().unwrap())
            .collect();
        assert_eq!(exposed, chart_ports, "{}: EXPOSE", image.target);
    }
}

#[test]
fn the_version_label_defaults_to_the_workspace_version() {
    let metadata = cargo_metadata();
    let version = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "sluice-control-plane")
        .and_then(|p| p["version"].as_str())
        .unwrap()
        .to_owned();
    let dockerfile = Dockerfile::load();
    let default = dockerfile
        .global_args
        .iter()
        .find_map(|arg| arg.strip_prefix("VERSION="))
        .expect("a global ARG VERSION=<default>");
    assert_eq!(default, version, "ARG VERSION's default");
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn is_rust_image(image: &str) -> bool {
    let name = image.split(':').next().unwrap();
    name == "rust" || name.ends_with("/rust")
}

/// Whether `text` names `port` as a port: after `:` or `/`, not followed by another digit.
fn mentions_port(text: &str, port: u64) -> bool {
    let port = port.to_string();
    text.match_indices(&port).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + port.len()..].chars().next();
        matches!(before, Some(':' | '/')) && !after.is_some_and(|c| c.is_ascii_digit())
    })
}

fn chart_values() -> Yaml {
    let path = root().join("deploy/helm/sluice/values.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap()
}

fn cargo_metadata() -> Json {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--format-version=1",
            "--no-deps",
            "--locked",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The names of the workspace's bin targets.
fn workspace_bins() -> BTreeSet<String> {
    let metadata = cargo_metadata();
    metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

/// One instruction: its keyword, upper-case, and its arguments with continuation lines joined.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
    /// The line it starts on, from 1.
    line: usize,
}

#[derive(Debug)]
struct Stage {
    name: Option<String>,
    /// The image or the stage it is built FROM.
    base: String,
    instructions: Vec<Instruction>,
}

#[derive(Debug)]
struct Dockerfile {
    /// `ARG`s before the first `FROM`, as written (`NAME` or `NAME=default`).
    global_args: Vec<String>,
    stages: Vec<Stage>,
}

impl Dockerfile {
    fn load() -> Self {
        let path = root().join("deploy/docker/Dockerfile");
        Self::parse(&std::fs::read_to_string(&path).unwrap())
    }

    fn parse(text: &str) -> Self {
        let mut dockerfile = Dockerfile {
            global_args: Vec::new(),
            stages: Vec::new(),
        };
        let mut pending: Option<Instruction> = None;
        for (number, line) in text.lines().enumerate() {
            let trimmed = line.trim();
            // Comments (parser directives included) are dropped, within continuations too.
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let (content, continues) = match trimmed.strip_suffix('\\') {
                Some(head) => (head.trim(), true),
                None => (trimmed, false),
            };
            match pending.as_mut() {
                Some(instruction) => {
                    instruction.args.push(' ');
                    instruction.args.push_str(content);
                }
                None => {
                    let (keyword, args) = content
                        .split_once(char::is_whitespace)
                        .unwrap_or((content, ""));
                    pending = Some(Instruction {
                        keyword: keyword.to_uppercase(),
                        args: args.trim().to_owned(),
                        line: number + 1,
                    });
                }
            }
            if !continues && let Some(instruction) = pending.take() {
                dockerfile.push(instruction);
            }
        }
        assert!(pending.is_none(), "the Dockerfile ends in a continuation");
        dockerfile
    }

    fn push(&mut self, instruction: Instruction) {
        if instruction.keyword == "FROM" {
            let words: Vec<&str> = instruction
                .args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                [_] => None,
                _ => panic!("line {}: FROM {}", instruction.line, instruction.args),
            };
            self.stages.push(Stage {
                name,
                base: words[0].to_owned(),
                instructions: Vec::new(),
            });
        } else if let Some(stage) = self.stages.last_mut() {
            stage.instructions.push(instruction);
        } else if instruction.keyword == "ARG" {
            self.global_args.push(instruction.args);
        }
    }

    fn instructions(&self) -> impl Iterator<Item = &Instruction> {
        self.stages.iter().flat_map(|s| &s.instructions)
    }

    /// The stage named `name`, then the stage it is built FROM, and so on: the target first,
    /// the one FROM an outside image last.
    fn chain(&self, name: &str) -> Vec<&Stage> {
        let mut chain = Vec::new();
        let mut next = Some(name);
        while let Some(name) = next {
            let stage = self
                .stages
                .iter()
                .find(|s| s.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("no stage named {name}"));
            assert!(
                chain.len() < self.stages.len(),
                "stages built FROM in a loop"
            );
            chain.push(stage);
            next = self
                .stages
                .iter()
                .any(|s| s.name.as_deref() == Some(&stage.base))
                .then_some(stage.base.as_str());
        }
        chain
    }
}

/// The chain's instructions in build order (the outside image's stage first).
fn instructions<'a>(chain: &[&'a Stage]) -> impl Iterator<Item = &'a Instruction> {
    chain.iter().rev().flat_map(|stage| &stage.instructions)
}

/// The instruction with this keyword that takes effect in the chain: the last one built.
fn last<'a>(chain: &[&'a Stage], keyword: &str) -> Option<&'a Instruction> {
    instructions(chain).filter(|i| i.keyword == keyword).last()
}
