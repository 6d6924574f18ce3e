#!/usr/bin/env bash
# Writes the book's command-line reference (docs/src/cli-reference.md) from the `resnet`
# binary's own --help, every subcommand in the order `resnet --help` lists them. The test
# `the_books_cli_reference_is_the_binarys_help` fails when the two differ.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p resnet-cli
bin=target/release/resnet
commands=$("$bin" --help | awk '/^Commands:/ { listed = 1; next } /^$/ { listed = 0 } listed && $1 != "help" { print $1 }')
{
  echo "# Reference: every subcommand's flags"
  echo
  echo "What \`resnet --help\` and \`resnet COMMAND --help\` print, written here by"
  echo "\`scripts/cli_reference.sh\` (a test fails when this page and the binary differ)."
  echo "The chapters around it say what the flags do together: [the command line](cli.md),"
  echo "[training](training.md)."
  echo
  echo '## `resnet`'
  echo
  echo '```text'
  "$bin" --help
  echo '```'
  for command in $commands; do
    echo
    echo "## \`resnet $command\`"
    echo
    echo '```text'
    "$bin" "$command" --help
    echo '```'
  done
} > docs/src/cli-reference.md
