#!/usr/bin/env bash
# Checks console-filter.sh: a console sample with the escape sequences the firmware sends
# (reset, clear screen, cursor home, no line wrap, window title, colours) and carriage
# returns goes in, the plain text must come out byte for byte; and a line must come out
# before the input ends (run.sh watches the console for its markers while the VM runs).
#
# Usage: tests/nvme-vm/console-filter-test.sh   (no VM, no build; under a second)
# Exit status: 0 when every case passes, 1 otherwise.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FILTER="$HERE/console-filter.sh"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

failed=0
# check NAME INPUT EXPECTED: INPUT and EXPECTED are printf formats (\e ESC, \a BEL, \r CR).
check() {
  local name=$1
  # shellcheck disable=SC2059 # the formats are the test data
  printf "$2" >"$TMP/in"
  # shellcheck disable=SC2059
  printf "$3" >"$TMP/want"
  bash "$FILTER" <"$TMP/in" >"$TMP/got"
  if cmp -s "$TMP/want" "$TMP/got"; then
    printf 'ok      %s\n' "$name"
  else
    printf 'FAILED  %s\n  input:\n' "$name"
    od -An -c "$TMP/in" | sed 's/^/   /'
    printf '  expected:\n'
    od -An -c "$TMP/want" | sed 's/^/   /'
    printf '  got:\n'
    od -An -c "$TMP/got" | sed 's/^/   /'
    failed=1
  fi
}

# What SeaBIOS sends at boot (as captured from the VM), then the guest's lines.
check "SeaBIOS reset, no-wrap and clear screen" \
  '\ec\e[?7l\e[2J\e[0mSeaBIOS (version 1.16.2-debian-1.16.2-1)\r\nBooting from ROM...\r\n\ec\e[?7l\e[2J\r\nNVMEVM: pci=0000:00:01.0 group=/dev/vfio/1\r\n' \
  'SeaBIOS (version 1.16.2-debian-1.16.2-1)\nBooting from ROM...\n\nNVMEVM: pci=0000:00:01.0 group=/dev/vfio/1\n'
check "cursor home, erase line, colours" \
  '\e[H\e[2J\e[1;1Htop\e[K\r\n\e[1;32mgreen\e[0m and \e[38;5;208morange\e[m\r\n' \
  'top\ngreen and orange\n'
check "window title (OSC ended by BEL or by ESC \\)" \
  '\e]0;iPXE title\abefore\e]2;other\e\\after\r\n' \
  'beforeafter\n'
check "unterminated OSC goes to the end of its line" \
  'kept\e]0;no end\r\nnext\r\n' \
  'kept\nnext\n'
check "carriage returns: line ends dropped, redraws become lines" \
  '\rprogress 10%%\rprogress 100%%\r\r\ndone\r\n' \
  'progress 10%%\nprogress 100%%\ndone\n'
check "two-byte sequences and other control characters" \
  '\e7\e(Bcharset\e8 \x0eshift\x0f bell\a back\bspace\r\n' \
  'charset shift bell backspace\n'
check "plain text untouched (brackets, tabs, UTF-8, other bytes, no final newline)" \
  '[    5.721490] reboot: Power down\n[2J is text\tcol2\nd\xc3\xa9j\xc3\xa0 vu \xff\nlast' \
  '[    5.721490] reboot: Power down\n[2J is text\tcol2\nd\xc3\xa9j\xc3\xa0 vu \xff\nlast'

# Streaming: the first line must come out while the input is still open.
coproc FILT { bash "$FILTER"; }
printf '\e[2Jmarker line\r\n' >&"${FILT[1]}"
if IFS= read -r -t 5 line <&"${FILT[0]}" && [[ $line == "marker line" ]]; then
  printf 'ok      %s\n' "a line comes out before the input ends"
else
  printf 'FAILED  %s (got: %q)\n' "a line comes out before the input ends" "${line:-}"
  failed=1
fi
exec {FILT[1]}>&-
wait "$FILT_PID" || true

if ((failed)); then
  echo "console-filter-test: FAILED" >&2
  exit 1
fi
echo "console-filter-test: all cases pass"
