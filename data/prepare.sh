#!/usr/bin/env bash
# Build data/austen.txt: Jane Austen's six novels, extracted from Debian's
# r-cran-janeaustenr package (downloaded with `apt-get download`, never
# installed).  Idempotent: does nothing if austen.txt already has the expected
# size.  See README.md in this directory.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

OUT=austen.txt
PKG=r-cran-janeaustenr
EXPECT_BYTES=4025029
EXPECT_SHA256=f2516f2139e3cecf49657122fed58ac46313f1fdff32a26fc66789293e92d573
# Publication order, the same order as janeaustenr::austen_books().
NOVELS=(sensesensibility prideprejudice mansfieldpark emma northangerabbey persuasion)
PYTHON=${PYTHON:-python3}

die() { echo "prepare.sh: error: $*" >&2; exit 1; }

if [[ -f $OUT ]] && [[ $(stat -c %s "$OUT") == "$EXPECT_BYTES" ]]; then
    echo "prepare.sh: $PWD/$OUT already present ($EXPECT_BYTES bytes); nothing to do"
    exit 0
fi

for cmd in apt-get dpkg-deb "$PYTHON" sha256sum mktemp; do
    command -v "$cmd" >/dev/null 2>&1 || die "required command '$cmd' not found"
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/janeaustenr.XXXXXX") || die "mktemp failed"
trap 'rm -rf "$TMP"' EXIT

download() { (cd "$TMP" && apt-get download "$PKG") >"$TMP/apt.log" 2>&1; }

echo "prepare.sh: fetching $PKG with apt-get download (not installing it)"
if ! download; then
    # Usually the package lists are missing or stale (fresh container).
    echo "prepare.sh: apt-get download failed; running apt-get update once and retrying" >&2
    [[ $(id -u) == 0 ]] || { cat "$TMP/apt.log" >&2; die "apt-get update needs root; run 'apt-get update' as root and retry"; }
    apt-get update >"$TMP/update.log" 2>&1 || { cat "$TMP/update.log" >&2; die "apt-get update failed"; }
    download || { cat "$TMP/apt.log" >&2; die "apt-get download $PKG failed"; }
fi

shopt -s nullglob
debs=("$TMP/${PKG}"_*.deb)
shopt -u nullglob
[[ ${#debs[@]} == 1 ]] || die "expected one ${PKG}_*.deb in $TMP, found ${#debs[@]}"
DEB=${debs[0]}

mkdir "$TMP/root"
dpkg-deb -x "$DEB" "$TMP/root" || die "dpkg-deb -x $DEB failed"

RDB=$(find "$TMP/root" -path '*/janeaustenr/data/Rdata.rdb' -type f | head -n 1)
[[ -n $RDB ]] || die "janeaustenr/data/Rdata.rdb not found in $(basename "$DEB")"
RDX=${RDB%.rdb}.rdx
[[ -f $RDX ]] || die "index $RDX not found next to Rdata.rdb"

"$PYTHON" extract_rdb.py --rdx "$RDX" -o "$TMP/$OUT" "$RDB" "${NOVELS[@]}" \
    || die "extract_rdb.py failed"

bytes=$(stat -c %s "$TMP/$OUT")
[[ $bytes == "$EXPECT_BYTES" ]] \
    || die "extracted $bytes bytes, expected $EXPECT_BYTES (package version changed?); not installing $OUT"
sha=$(sha256sum "$TMP/$OUT" | cut -d' ' -f1)
[[ $sha == "$EXPECT_SHA256" ]] \
    || die "sha256 of extracted text is $sha, expected $EXPECT_SHA256; not installing $OUT"

mv -f "$TMP/$OUT" "$OUT"
echo "prepare.sh: source: $(basename "$DEB"), ${RDB#"$TMP/root"}"
sed -n 's/^Get:[0-9]* /prepare.sh: fetched from: /p' "$TMP/apt.log"
echo "prepare.sh: order: ${NOVELS[*]}"
echo "prepare.sh: wrote $PWD/$OUT: $bytes bytes, sha256 $sha"
