#!/usr/bin/env bash
# Filter for the VM's serial console: stdin to stdout, line by line as it arrives.
#
# The firmware (SeaBIOS, and iPXE when a NIC has an option ROM) drives the console as a
# terminal: it resets it (ESC c), clears the screen (ESC [2J), homes the cursor, turns off
# line wrapping (ESC [?7l) and sets window titles (ESC ] ... BEL). Echoed as they are,
# these wipe the terminal of whoever runs the tests, in the middle of the run, and leave
# it without line wrapping. What is removed:
#   - CSI sequences: ESC [ parameters intermediates final (colours, cursor, clearing)
#   - strings: OSC (ESC ]), DCS (ESC P), SOS (ESC X), PM (ESC ^), APC (ESC _), up to
#     their terminator (BEL or ESC \), or to the end of the line when it is missing
#   - other escape sequences: ESC, any intermediates, one final byte (ESC c, ESC 7, ESC ( B)
#   - carriage returns: at the ends of a line they go (CR LF is the serial line's line
#     end); inside a line, where they would send the cursor back to redraw it, they
#     become line ends, so that no text is lost by being drawn over
#   - the remaining control characters (BEL, BS, SO/SI, a lone ESC, ...), except TAB
# Ordinary text, tabs and line ends are kept; bytes that are not valid UTF-8 pass through.
#
# Usage: ... | tests/nvme-vm/console-filter.sh
# Exit status: sed's (0 unless it cannot read or write).
set -euo pipefail

# GNU sed: -u writes each line as soon as it is read (the console streams, and the
# markers run.sh watches for must not wait in a buffer); -E extended regular expressions;
# \xHH escapes; LC_ALL=C so that every byte is one character (firmware output need not
# be UTF-8) and the ranges below are byte ranges.
#   \x1b ESC, \x07 BEL, [0-?] CSI parameter bytes, [ -/] intermediate bytes,
#   [@-~] CSI final bytes, [0-~] final bytes of the other escape sequences.
exec env LC_ALL=C sed -u -E \
  -e 's/\x1b[]PX^_][^\x07\x1b]*(\x07|\x1b\\)?//g' \
  -e 's/\x1b\[[0-?]*[ -/]*[@-~]?//g' \
  -e 's/\x1b[ -/]*[0-~]//g' \
  -e 's/^\r+//' \
  -e 's/\r+$//' \
  -e 's/\r+/\n/g' \
  -e 's/[\x01-\x08\x0b-\x1f\x7f]//g'
