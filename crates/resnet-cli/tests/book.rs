//! The book (`docs/`, an mdBook) and the README stay true: every internal link and anchor
//! resolves, every chapter is in the summary, the command-line reference is the binary's
//! own `--help`, and the README's two commands are the ones the book and CI run. (The
//! book's Rust examples run as doctests of `resnet-io`; `.ci/run` builds the book.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn book_src() -> PathBuf {
    repo_root().join("docs/src")
}

fn markdown_files(dir: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            markdown_files(&path, found)?;
        } else if path.extension().is_some_and(|e| e == "md") {
            found.push(path);
        }
    }
    Ok(())
}

/// The text outside fenced code blocks (links inside code are not links).
fn prose(markdown: &str) -> String {
    let mut in_code = false;
    let mut kept = String::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if !in_code {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    kept
}

/// Every `](target)` of a Markdown text, inline code spans left out.
fn link_targets(markdown: &str) -> Vec<String> {
    let text: String = prose(markdown)
        .split('`')
        .step_by(2)
        .collect::<Vec<_>>()
        .join(" ");
    text.match_indices("](")
        .filter_map(|(at, _)| {
            let rest = &text[at + 2..];
            rest.find(')').map(|end| rest[..end].trim().to_string())
        })
        .collect()
}

/// The anchors mdBook gives a chapter's headings: the heading's text lower-cased,
/// whitespace as `-`, only letters, digits, `-` and `_` kept; repeats get `-1`, `-2`...
fn heading_ids(markdown: &str) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for line in prose(markdown).lines() {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let text = heading.trim_start_matches('#').trim();
        let id: String = text
            .chars()
            .filter_map(|c| {
                if c.is_alphanumeric() || c == '_' || c == '-' {
                    Some(c.to_ascii_lowercase())
                } else if c.is_whitespace() {
                    Some('-')
                } else {
                    None
                }
            })
            .collect();
        let mut unique = id.clone();
        let mut repeat = 1;
        while ids.contains(&unique) {
            unique = format!("{id}-{repeat}");
            repeat += 1;
        }
        ids.insert(unique);
    }
    ids
}

/// Checks the links of one Markdown file; returns what is broken.
fn broken_links(file: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(file)?;
    let dir = file.parent().context("a file has a folder")?;
    let mut broken = Vec::new();
    for target in link_targets(&text) {
        if target.contains("://") || target.starts_with("mailto:") {
            continue;
        }
        let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
        let linked = if path.is_empty() {
            file.to_path_buf()
        } else {
            dir.join(path)
        };
        if !linked.exists() {
            broken.push(format!("{}: {target} (no such file)", file.display()));
            continue;
        }
        if !anchor.is_empty() && linked.extension().is_some_and(|e| e == "md") {
            let ids = heading_ids(&std::fs::read_to_string(&linked)?);
            if !ids.contains(anchor) {
                broken.push(format!(
                    "{}: {target} (no heading with that anchor; it has {ids:?})",
                    file.display()
                ));
            }
        }
    }
    Ok(broken)
}

#[test]
fn every_chapter_is_in_the_summary_and_every_link_resolves() -> Result<()> {
    let src = book_src();
    let summary = std::fs::read_to_string(src.join("SUMMARY.md"))?;
    let listed: BTreeSet<PathBuf> = link_targets(&summary)
        .iter()
        .map(|target| src.join(target))
        .collect();
    let mut chapters = Vec::new();
    markdown_files(&src, &mut chapters)?;
    let mut broken = Vec::new();
    for chapter in &chapters {
        if chapter.file_name().is_some_and(|n| n == "SUMMARY.md") {
            continue;
        }
        if !listed.contains(chapter) {
            broken.push(format!("{}: not in SUMMARY.md", chapter.display()));
        }
        broken.extend(broken_links(chapter)?);
    }
    broken.extend(broken_links(&src.join("SUMMARY.md"))?);
    broken.extend(broken_links(&repo_root().join("README.md"))?);
    ensure!(broken.is_empty(), "broken:\n{}", broken.join("\n"));
    ensure!(
        chapters.len() >= 12,
        "the book has {} chapters",
        chapters.len()
    );
    Ok(())
}

#[test]
fn the_link_checker_finds_what_is_broken() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let page = dir.path().join("page.md");
    std::fs::write(
        dir.path().join("other.md"),
        "# Other page\n## A `code` part\n",
    )?;
    std::fs::write(
        &page,
        "# Page\n[ok](other.md#a-code-part) [gone](missing.md) [bad](other.md#nothing)\n\
         [here](#page) `[not](a link)`\n```text\n[not](either)\n```\n",
    )?;
    let broken = broken_links(&page)?;
    assert_eq!(broken.len(), 2, "{broken:?}");
    assert!(broken[0].contains("missing.md") && broken[1].contains("#nothing"));
    Ok(())
}

/// The README's ```bash block of the two commands.
fn readme_two_commands() -> Result<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md"))?;
    let block = readme
        .split("```bash\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .context("README.md has no ```bash block")?;
    Ok(block.to_string())
}

#[test]
fn the_readme_commands_are_the_ones_the_book_and_ci_run() -> Result<()> {
    let commands = readme_two_commands()?;
    let lines: Vec<&str> = commands
        .lines()
        .filter(|l| l.starts_with("cargo "))
        .collect();
    ensure!(lines.len() == 2, "two commands, found {lines:?}");
    let getting_started = std::fs::read_to_string(book_src().join("getting-started.md"))?;
    ensure!(
        getting_started.contains(&commands),
        "docs/src/getting-started.md does not show the README's two commands:\n{commands}"
    );
    let ci = std::fs::read_to_string(repo_root().join(".ci/run"))?;
    ensure!(
        ci.lines().any(|l| l.trim() == lines[1]),
        ".ci/run does not run the README's test command `{}`",
        lines[1]
    );
    Ok(())
}

fn help(args: &[&str]) -> Result<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_resnet"))
        .args(args)
        .output()?;
    ensure!(output.status.success(), "resnet {args:?} failed");
    Ok(String::from_utf8(output.stdout)?)
}

#[test]
fn the_books_cli_reference_is_the_binarys_help() -> Result<()> {
    let reference = std::fs::read_to_string(book_src().join("cli-reference.md"))?;
    let top = help(&["--help"])?;
    let commands: Vec<&str> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|&c| c != "help")
        .collect();
    ensure!(commands.contains(&"train"), "{top}");
    let mut stale = Vec::new();
    for (title, args) in std::iter::once(("resnet".to_string(), vec!["--help"])).chain(
        commands
            .iter()
            .map(|&c| (format!("resnet {c}"), vec![c, "--help"])),
    ) {
        let expected = format!("## `{title}`\n\n```text\n{}```\n", help(&args)?);
        if !reference.contains(&expected) {
            stale.push(title);
        }
    }
    ensure!(
        stale.is_empty(),
        "docs/src/cli-reference.md differs from the binary's --help for {stale:?}: \
         run scripts/cli_reference.sh"
    );
    Ok(())
}

#[test]
fn every_chapter_with_rust_examples_runs_them_as_doctests() -> Result<()> {
    let lib = std::fs::read_to_string(repo_root().join("crates/resnet-io/src/lib.rs"))?;
    let src = book_src();
    let mut chapters = Vec::new();
    markdown_files(&src, &mut chapters)?;
    let mut missing = Vec::new();
    for chapter in chapters {
        let text = std::fs::read_to_string(&chapter)?;
        let relative = chapter
            .strip_prefix(&src)?
            .to_string_lossy()
            .replace('\\', "/");
        if text.contains("```rust") && !lib.contains(&format!("\"{relative}\"")) {
            missing.push(relative);
        }
    }
    ensure!(
        missing.is_empty(),
        "chapters with Rust examples that crates/resnet-io/src/lib.rs does not include as \
         doctests: {missing:?}"
    );
    Ok(())
}
