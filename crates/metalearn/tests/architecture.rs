//! The architecture test: reads the sources of the three crates and fails on an import that goes
//! against the layer order written down here (and in ARCHITECTURE.md), on a cycle of imports
//! between the files of a crate, and on a crate that depends on one it must not. Each failure
//! names the file, the line and the import.
//!
//! An import is any path a file names (`use` or inline): `crate::a::b`, `super::a`, `self::a`, a
//! child module's name in a `mod.rs` or `lib.rs`, and `metalearn::a` in the command-line crate.
//! Comments, string literals and `#[cfg(test)]` modules are left out; the crate root (`lib.rs`,
//! which only declares and re-exports) is neither a source nor a target.
//!
//! `cargo test --test architecture -- --nocapture` prints the import graph's figures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The library's top-level modules from the bottom layer up. A module may import modules of
/// lower layers only (and its own files); modules of one layer do not import each other.
const LIBRARY_LAYERS: &[&[&str]] = &[
    &["error"],
    &["fsutil"],
    &[
        "config",
        "distributed",
        "hub",
        "kernels",
        "plot",
        "progress",
    ],
    &["nn"],
    &["train"],
    &["checkpoint"],
    &["sequential"],
    &["data", "keras", "text", "vision"],
    &["tasks"],
    &["meta"],
    &["eval"],
    &["meta_training"],
    &["experiment", "transfer"],
    &["demos", "inspect", "workloads"],
];

/// The command-line crate's top-level modules, the same way: console output, the argument groups
/// several commands share, the commands (one file each), and `main`.
const CLI_LAYERS: &[&[&str]] = &[&["console"], &["args"], &["commands"], &["main"]];

/// What each crate may depend on (normal dependencies, from its Cargo.toml).
const KERNELS_DEPENDENCIES: &[&str] = &["candle-core", "gemm", "pulp", "rayon"];

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One import: the file and line it is on, and the module it names.
#[derive(Clone, Debug)]
struct Import {
    from: Vec<String>,
    to: Vec<String>,
    file: PathBuf,
    line: usize,
    text: String,
}

/// The sources of one crate: module path → (file, code without comments, strings and tests).
struct CrateSources {
    root: PathBuf,
    modules: BTreeMap<Vec<String>, (PathBuf, String)>,
}

impl CrateSources {
    fn read(src: &Path) -> Self {
        let mut modules = BTreeMap::new();
        let mut stack = vec![src.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in
                std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    modules.insert(module_path(src, &path), (path, code_only(&text)));
                }
            }
        }
        Self {
            root: src.to_path_buf(),
            modules,
        }
    }

    /// Every import between two different files of the crate (the crate root left out), and,
    /// with `external = Some((name, crate))`, the imports of that other crate's modules.
    ///
    /// A `pub use` in a module file re-exports: it is not an import of that file, and an import
    /// of the re-exported name counts as an import of the file that defines it.
    fn imports(&self, external: Option<(&str, &CrateSources)>) -> (Vec<Import>, Vec<Import>) {
        let reexports = self.reexports();
        let mut internal = Vec::new();
        let mut outward = Vec::new();
        for (module, (file, code)) in &self.modules {
            if module.is_empty() {
                continue;
            }
            let spans = reexport_spans(code);
            let lines: Vec<&str> = code.lines().collect();
            for (start, path) in paths_in(code) {
                if spans.iter().any(|r| r.contains(&start)) {
                    continue;
                }
                let line_no = code[..start].matches('\n').count();
                let import = |to| Import {
                    from: module.clone(),
                    to,
                    file: file.clone(),
                    line: line_no + 1,
                    text: lines.get(line_no).map_or("", |l| l.trim()).to_string(),
                };
                if let Some(absolute) = self.absolute(module, file, code, start, &path) {
                    if let Some(target) = self.target(&absolute, &reexports) {
                        if !target.is_empty() && &target != module {
                            internal.push(import(target));
                        }
                    }
                } else if let Some((name, other)) = external {
                    if path[0] == name && !preceded_by_colons(code, start) {
                        if let Some(target) = other.longest_module(&path[1..]) {
                            outward.push(import(target));
                        }
                    }
                }
            }
        }
        (internal, outward)
    }

    /// The crate-absolute path a path of `module` names, or `None` when it names no module of
    /// this crate (a type, another crate).
    fn absolute(
        &self,
        module: &[String],
        file: &Path,
        code: &str,
        start: usize,
        path: &[String],
    ) -> Option<Vec<String>> {
        let mut absolute = match path[0].as_str() {
            "crate" => Vec::new(),
            // `super` of a file `a/b.rs` is `a`; of `a/b/mod.rs` it is `a` as well.
            "super" => module[..module.len() - 1].to_vec(),
            "self" => module.to_vec(),
            first => {
                let is_dir_module = file.file_name().is_some_and(|n| n == "mod.rs");
                if !is_dir_module
                    || !declared_children(code).contains(first)
                    || preceded_by_colons(code, start)
                {
                    return None;
                }
                let mut p = module.to_vec();
                p.push(first.to_string());
                p
            }
        };
        absolute.extend(path[1..].iter().cloned());
        Some(absolute)
    }

    /// The module a crate-absolute path lands in, following re-exports.
    fn target(
        &self,
        absolute: &[String],
        reexports: &BTreeMap<(Vec<String>, String), Vec<String>>,
    ) -> Option<Vec<String>> {
        let mut target = self.longest_module(absolute)?;
        for _ in 0..8 {
            let Some(item) = absolute.get(target.len()) else {
                break;
            };
            match reexports.get(&(target.clone(), item.clone())) {
                Some(source) if *source != target => target = source.clone(),
                _ => break,
            }
        }
        Some(target)
    }

    /// `(module, name)` → the module a `pub use` of that module file takes `name` from.
    fn reexports(&self) -> BTreeMap<(Vec<String>, String), Vec<String>> {
        let mut out = BTreeMap::new();
        for (module, (file, code)) in &self.modules {
            for span in reexport_spans(code) {
                for (start, path) in paths_in(&code[span.clone()]) {
                    let Some(absolute) =
                        self.absolute(module, file, code, span.start + start, &path)
                    else {
                        continue;
                    };
                    if let (Some(source), Some(name)) =
                        (self.longest_module(&absolute), path.last())
                    {
                        out.insert((module.clone(), name.clone()), source);
                    }
                }
            }
        }
        out
    }

    /// The longest prefix of `path` that is a module of this crate.
    fn longest_module(&self, path: &[String]) -> Option<Vec<String>> {
        (0..=path.len())
            .rev()
            .map(|k| path[..k].to_vec())
            .find(|p| self.modules.contains_key(p))
    }

    fn relative(&self, file: &Path) -> String {
        file.strip_prefix(self.root.parent().unwrap_or(&self.root))
            .unwrap_or(file)
            .display()
            .to_string()
    }
}

/// `src/a/b.rs` → `[a, b]`; `src/a/mod.rs` → `[a]`; `src/lib.rs` → `[]`; `src/main.rs` →
/// `[main]` (the binary's root is a module like the others, so that commands cannot import it).
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    match (parts.is_empty(), stem) {
        (true, "lib") => {}
        (_, "mod") => {}
        _ => parts.push(stem.to_string()),
    }
    parts
}

/// The names of `mod x;` declarations of a file.
fn declared_children(code: &str) -> BTreeSet<&str> {
    code.lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l
                .strip_prefix("pub(crate) ")
                .or_else(|| l.strip_prefix("pub "))
                .unwrap_or(l);
            l.strip_prefix("mod ")?.strip_suffix(';')
        })
        .collect()
}

/// Byte ranges of the `pub use ...;` statements of a file.
fn reexport_spans(code: &str) -> Vec<std::ops::Range<usize>> {
    let mut spans = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find("pub use ") {
        let start = from + at;
        let end = code[start..].find(';').map_or(code.len(), |e| start + e);
        spans.push(start..end);
        from = end;
    }
    spans
}

fn preceded_by_colons(line: &str, start: usize) -> bool {
    line[..start].trim_end().ends_with("::")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every `a::b::c` path in a line with its byte offset; a brace group (`a::{b, c::d}`) yields
/// each member as its own path.
fn paths_in(line: &str) -> Vec<(usize, Vec<String>)> {
    let bytes: Vec<char> = line.chars().collect();
    let offsets: Vec<usize> = line.char_indices().map(|(i, _)| i).collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if is_ident(bytes[i]) && (i == 0 || !is_ident(bytes[i - 1])) {
            let start = i;
            let mut segments = Vec::new();
            let mut j = i;
            loop {
                let seg_start = j;
                while j < bytes.len() && is_ident(bytes[j]) {
                    j += 1;
                }
                segments.push(bytes[seg_start..j].iter().collect::<String>());
                if j + 2 < bytes.len() + 1
                    && j + 1 < bytes.len()
                    && bytes[j] == ':'
                    && bytes[j + 1] == ':'
                {
                    j += 2;
                    if j < bytes.len() && bytes[j] == '{' {
                        // A group: each member continues the prefix.
                        let close = matching_brace(&bytes, j);
                        let inner: String = bytes[(j + 1).min(close)..close].iter().collect();
                        for member in split_top_level(&inner) {
                            let member = member.trim();
                            if member.is_empty() || member == "self" {
                                continue;
                            }
                            let mut p = segments.clone();
                            match paths_in(member).into_iter().next() {
                                Some((_, rest)) => p.extend(rest),
                                None => {
                                    p.push(member.chars().take_while(|&c| is_ident(c)).collect())
                                }
                            }
                            out.push((offsets[start], p));
                        }
                        j = close + 1;
                        segments.clear();
                        break;
                    }
                    if j < bytes.len() && is_ident(bytes[j]) {
                        continue;
                    }
                }
                break;
            }
            if segments.len() > 1 {
                out.push((offsets[start], segments));
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

fn matching_brace(chars: &[char], open: usize) -> usize {
    let mut depth = 0;
    for (k, &c) in chars.iter().enumerate().skip(open) {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return k;
                }
            }
            _ => {}
        }
    }
    chars.len()
}

fn split_top_level(text: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut depth = 0;
    for c in text.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(String::new());
                continue;
            }
            _ => {}
        }
        parts.last_mut().unwrap().push(c);
    }
    parts
}

/// The code of a file with comments and string and character literals blanked (line breaks
/// kept, so line numbers hold) and `#[cfg(test)]` modules removed.
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && (i == 0 || !is_ident(chars[i - 1]))
        {
            // A raw string: r"..." or r#"..."#.
            let mut hashes = 0;
            let mut j = i + 1;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            while j < chars.len() {
                if chars[j] == '"' && (1..=hashes).all(|h| chars.get(j + h) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            for &ch in &chars[i..j.min(chars.len())] {
                out.push(blank(ch));
            }
            i = j;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\''); anything else is a lifetime.
            let literal_end = if next == Some('\\') {
                (i + 2..chars.len().min(i + 12)).find(|&k| chars[k] == '\'')
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match literal_end {
                Some(end) => {
                    for _ in i..=end {
                        out.push(' ');
                    }
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    // The unit tests sit at the end of a file, in a `#[cfg(test)]` module.
    let mut kept = Vec::new();
    let lines: Vec<&str> = out.lines().collect();
    let mut k = 0;
    while k < lines.len() {
        if lines[k].trim() == "#[cfg(test)]"
            && lines[k + 1..]
                .iter()
                .find(|l| !l.trim().is_empty())
                .is_some_and(|l| l.trim_start().starts_with("mod "))
        {
            break;
        }
        kept.push(lines[k]);
        k += 1;
    }
    kept.join("\n")
}

/// The layer index of each top-level module.
fn layer_of(layers: &[&[&str]]) -> BTreeMap<String, usize> {
    layers
        .iter()
        .enumerate()
        .flat_map(|(i, names)| names.iter().map(move |n| (n.to_string(), i)))
        .collect()
}

/// Imports that go against the layers: to a higher layer or a peer of the same layer, or from or
/// to a top-level module the layer list does not know.
fn layer_violations(sources: &CrateSources, imports: &[Import], layers: &[&[&str]]) -> Vec<String> {
    let layer = layer_of(layers);
    let mut problems = Vec::new();
    for top in sources.modules.keys().filter_map(|m| m.first()) {
        if !layer.contains_key(top) {
            problems.push(format!(
                "{}: module `{top}` is in no layer; add it to the layer list of tests/architecture.rs and ARCHITECTURE.md",
                sources.root.display()
            ));
        }
    }
    for import in imports {
        let (from, to) = (&import.from[0], &import.to[0]);
        if from == to {
            continue;
        }
        if let (Some(a), Some(b)) = (layer.get(from), layer.get(to)) {
            if b >= a {
                problems.push(format!(
                    "{}:{}: `{from}` (layer {a}) imports `{to}` (layer {b}), which is not below it: {}",
                    sources.relative(&import.file),
                    import.line,
                    import.text
                ));
            }
        }
    }
    problems.sort();
    problems.dedup();
    problems
}

/// Strongly connected groups of more than one file, each with the imports inside it.
fn cycles(imports: &[Import]) -> Vec<Vec<Import>> {
    let mut graph: BTreeMap<&Vec<String>, BTreeSet<&Vec<String>>> = BTreeMap::new();
    for import in imports {
        graph.entry(&import.from).or_default().insert(&import.to);
        graph.entry(&import.to).or_default();
    }
    // Kosaraju: finish order on the graph, then components on the reversed graph.
    let nodes: Vec<&Vec<String>> = graph.keys().copied().collect();
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for &start in &nodes {
        if seen.contains(start) {
            continue;
        }
        let mut stack = vec![(start, false)];
        while let Some((node, done)) = stack.pop() {
            if done {
                order.push(node);
                continue;
            }
            if !seen.insert(node) {
                continue;
            }
            stack.push((node, true));
            for &next in &graph[node] {
                if !seen.contains(next) {
                    stack.push((next, false));
                }
            }
        }
    }
    let mut reversed: BTreeMap<&Vec<String>, Vec<&Vec<String>>> = BTreeMap::new();
    for (&from, tos) in &graph {
        for &to in tos {
            reversed.entry(to).or_default().push(from);
        }
    }
    let mut component: BTreeMap<&Vec<String>, usize> = BTreeMap::new();
    let mut count = 0;
    for &node in order.iter().rev() {
        if component.contains_key(node) {
            continue;
        }
        let mut stack = vec![node];
        while let Some(n) = stack.pop() {
            if component.contains_key(n) {
                continue;
            }
            component.insert(n, count);
            stack.extend(reversed.get(n).into_iter().flatten().copied());
        }
        count += 1;
    }
    let mut groups: BTreeMap<usize, Vec<Import>> = BTreeMap::new();
    let mut sizes: BTreeMap<usize, usize> = BTreeMap::new();
    for c in component.values() {
        *sizes.entry(*c).or_default() += 1;
    }
    for import in imports {
        let (a, b) = (component[&import.from], component[&import.to]);
        if a == b && sizes[&a] > 1 {
            groups.entry(a).or_default().push(import.clone());
        }
    }
    groups.into_values().collect()
}

/// Figures of a crate's import graph between top-level modules: arrows, levels (the longest
/// chain of arrows, plus one), file-level cycles.
fn report(name: &str, sources: &CrateSources, imports: &[Import]) {
    let mut arrows: BTreeSet<(&str, &str)> = BTreeSet::new();
    for i in imports {
        if i.from[0] != i.to[0] {
            arrows.insert((&i.from[0], &i.to[0]));
        }
    }
    let tops: BTreeSet<&str> = sources
        .modules
        .keys()
        .filter_map(|m| m.first())
        .map(String::as_str)
        .collect();
    // Levels: 1 for a module that imports none of the others, else one more than the highest it
    // imports (undefined while top-level modules import each other in a circle).
    let mut level: BTreeMap<&str, usize> = tops.iter().map(|t| (*t, 1)).collect();
    for _ in 0..tops.len() {
        for &(a, b) in &arrows {
            let candidate = level[b] + 1;
            if candidate > level[a] && candidate <= tops.len() {
                level.insert(a, candidate);
            }
        }
    }
    let files = sources.modules.len();
    let largest = sources
        .modules
        .values()
        .map(|(file, _)| {
            (
                std::fs::read_to_string(file).unwrap().lines().count(),
                sources.relative(file),
            )
        })
        .max()
        .unwrap_or_default();
    let mutual = arrows
        .iter()
        .filter(|(a, b)| a < b && arrows.contains(&(b, a)))
        .count();
    println!(
        "{name}: {files} files, {} top-level modules, {} arrows between them ({mutual} pairs both ways), {} levels, {} file cycles; largest file {} ({} lines)",
        tops.len(),
        arrows.len(),
        match level.values().max().copied().unwrap_or(0) {
            top if top < tops.len() || tops.len() < 2 => top.to_string(),
            _ => "no".to_string() + " (modules import each other in a circle)",
        },
        cycles(imports).len(),
        largest.1,
        largest.0
    );
}

fn describe_cycles(sources: &CrateSources, groups: &[Vec<Import>]) -> Vec<String> {
    groups
        .iter()
        .map(|group| {
            let lines: Vec<String> = group
                .iter()
                .map(|i| {
                    format!(
                        "  {}:{}: {} -> {}: {}",
                        sources.relative(&i.file),
                        i.line,
                        i.from.join("::"),
                        i.to.join("::"),
                        i.text
                    )
                })
                .collect();
            format!(
                "files that import each other in a circle:\n{}",
                lines.join("\n")
            )
        })
        .collect()
}

#[test]
fn library_imports_follow_the_layers_without_cycles() {
    let library = CrateSources::read(&crates_dir().join("metalearn/src"));
    let (imports, _) = library.imports(None);
    report("metalearn", &library, &imports);
    let mut problems = layer_violations(&library, &imports, LIBRARY_LAYERS);
    problems.extend(describe_cycles(&library, &cycles(&imports)));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        imports.len() > 100,
        "only {} imports found: is the reader broken?",
        imports.len()
    );
}

#[test]
fn kernels_crate_is_a_leaf_without_cycles() {
    let kernels = CrateSources::read(&crates_dir().join("kernels/src"));
    let (imports, _) = kernels.imports(None);
    report("metalearn-kernels", &kernels, &imports);
    let problems = describe_cycles(&kernels, &cycles(&imports));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let manifest = std::fs::read_to_string(crates_dir().join("kernels/Cargo.toml")).unwrap();
    let dependencies = dependency_names(&manifest);
    for name in &dependencies {
        assert!(
            KERNELS_DEPENDENCIES.contains(&name.as_str()),
            "crates/kernels/Cargo.toml depends on `{name}`; the kernels crate takes only {KERNELS_DEPENDENCIES:?}"
        );
    }
    assert!(
        !dependencies.is_empty(),
        "no dependencies read from crates/kernels/Cargo.toml"
    );
}

#[test]
fn command_line_crate_follows_its_layers_and_the_library_has_no_clap() {
    let library = CrateSources::read(&crates_dir().join("metalearn/src"));
    let cli = CrateSources::read(&crates_dir().join("cli/src"));
    let (imports, outward) = cli.imports(Some(("metalearn", &library)));
    report("metalearn-cli", &cli, &imports);
    let mut problems = layer_violations(&cli, &imports, CLI_LAYERS);
    problems.extend(describe_cycles(&cli, &cycles(&imports)));
    // One file per command, none built on another: what two commands share lives in `args`,
    // `console` or the library.
    for i in &imports {
        if i.from.len() == 2 && i.to.len() == 2 && i.from[0] == "commands" && i.to[0] == "commands"
        {
            problems.push(format!(
                "{}:{}: command `{}` imports command `{}`; move what they share to args.rs, console.rs or the library: {}",
                cli.relative(&i.file),
                i.line,
                i.from[1],
                i.to[1],
                i.text
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        !outward.is_empty(),
        "the command line imports nothing from the library?"
    );
    let manifest = std::fs::read_to_string(crates_dir().join("metalearn/Cargo.toml")).unwrap();
    let dependencies = dependency_names(&manifest);
    assert!(
        dependencies.iter().any(|d| d == "candle-core"),
        "{dependencies:?}"
    );
    assert!(
        !dependencies.iter().any(|d| d == "clap"),
        "the library crate depends on clap: argument parsing belongs to crates/cli"
    );
}

/// The reader itself, on code made to trip it.
#[test]
fn reader_finds_paths_and_skips_comments_strings_and_tests() {
    let code = code_only(
        "use crate::a::{b, c::d};\n// crate::hidden::x\nlet s = \"crate::in_string\";\nlet c = '\"'; crate::e::f(); \n#[cfg(test)]\nmod tests {\n    use crate::test_only;\n}\n",
    );
    let found: Vec<String> = code
        .lines()
        .flat_map(paths_in)
        .map(|(_, p)| p.join("::"))
        .collect();
    assert_eq!(
        found,
        ["crate::a::b", "crate::a::c::d", "crate::e::f"],
        "{code}"
    );
}

/// The checks themselves, on a small crate made to break both rules.
#[test]
fn checks_catch_an_upward_import_and_a_cycle() {
    let dir = std::env::temp_dir().join(format!("metalearn-architecture-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("high")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod high;\npub mod low;\n").unwrap();
    std::fs::write(src.join("low.rs"), "//! Low.\n\nuse crate::high::Thing;\n").unwrap();
    std::fs::write(src.join("high/mod.rs"), "mod part;\nuse part::Piece;\n").unwrap();
    std::fs::write(
        src.join("high/part.rs"),
        "use crate::high::Thing;\nuse super::super::low;\n",
    )
    .unwrap();
    let sources = CrateSources::read(&src);
    let (imports, _) = sources.imports(None);
    let violations = layer_violations(&sources, &imports, &[&["low"], &["high"]]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(
        violations[0].ends_with("low.rs:3: `low` (layer 0) imports `high` (layer 1), which is not below it: use crate::high::Thing;"),
        "{violations:?}"
    );
    let found = cycles(&imports);
    assert_eq!(found.len(), 1, "{imports:?}");
    let members: BTreeSet<String> = found[0].iter().map(|i| i.from.join("::")).collect();
    assert_eq!(
        members,
        BTreeSet::from(["high".to_string(), "high::part".to_string()])
    );
}

/// The names under `[dependencies]` of a Cargo.toml.
fn dependency_names(manifest: &str) -> Vec<String> {
    let mut in_section = false;
    let mut names = Vec::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_section = line == "[dependencies]";
            continue;
        }
        if in_section {
            if let Some((name, _)) = line.split_once('=') {
                let name = name.trim().trim_end_matches(".workspace").to_string();
                if !name.is_empty() && !name.starts_with('#') {
                    names.push(name);
                }
            }
        }
    }
    names
}
