#!/usr/bin/env python3
"""Minimal extractor for R lazy-load databases (.rdb/.rdx), stdlib only.

Enough of R's XDR serialization format to read the character vectors in
r-cran-janeaustenr's data/Rdata.rdb (and its .rdx index).  Anything outside
that subset is reported as an error rather than guessed at.

Layout
  NAME.rdx  gzip/zlib-compressed serialization of a list with elements
            "variables"  (named list: object name -> integer c(offset, length)),
            "references" and "compressed" (TRUE = zlib chunks).
  NAME.rdb  concatenated chunks; the chunk for an object is the byte range
            [offset, offset+length): a 4-byte big-endian uncompressed length
            followed by one zlib stream holding a serialization.

Serialization ("X\\n" = XDR, big-endian)
  int format version (2 or 3), int writer R version, int min reader version,
  [version 3: int n, n bytes naming the native encoding], then one object.
  Each object begins with a flags int: type = flags & 0xff, bit 8 = is-object,
  bit 9 = has attributes, bit 10 = has tag, bits 12.. = "levels" (for CHARSXP:
  encoding flags).  Attributes follow the object body as a pairlist.

Supported types: 0/254 NULL, 1 SYMSXP, 2 LISTSXP (pairlist), 9 CHARSXP,
10 LGLSXP, 13 INTSXP, 16 STRSXP, 19 VECSXP, 255 REFSXP (back-reference to a
symbol).

Usage
  extract_rdb.py --list DB.rdb                 list objects in the index
  extract_rdb.py DB.rdb -o OUT.txt NAME...     write the named character
                                               vectors in the order given,
                                               one element per line ('\\n'
                                               after each), NA skipped, UTF-8
  (the index is DB.rdx next to DB.rdb unless --rdx is given)
"""

import argparse
import os
import struct
import sys
import zlib


class RdbError(Exception):
    pass


NILVALUE_SXP = 254
REFSXP = 255
NILSXP, SYMSXP, LISTSXP, CHARSXP = 0, 1, 2, 9
LGLSXP, INTSXP, STRSXP, VECSXP = 10, 13, 16, 19

NA_INTEGER = -2147483648

# CHARSXP encoding bits in the "levels" field (R's Defn.h)
BYTES_MASK, LATIN1_MASK, UTF8_MASK, ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6

TYPE_NAMES = {
    NILSXP: "NULL", SYMSXP: "symbol", LISTSXP: "pairlist", CHARSXP: "CHARSXP",
    LGLSXP: "logical", INTSXP: "integer", STRSXP: "character",
    VECSXP: "list", NILVALUE_SXP: "NULL", REFSXP: "reference",
}


class Symbol(str):
    """An R symbol (distinct from a plain string)."""


class RObject:
    """A vector with R attributes (only created when attributes exist)."""

    def __init__(self, rtype, value, attrs):
        self.rtype, self.value, self.attrs = rtype, value, attrs

    def names(self):
        return self.attrs.get("names")


class Reader:
    def __init__(self, data, what):
        self.data, self.pos, self.what = data, 0, what
        self.refs = []          # reference table (symbols only here)
        self.native_encoding = None

    def fail(self, msg):
        raise RdbError("%s: %s (at byte %d of %d)"
                       % (self.what, msg, self.pos, len(self.data)))

    def take(self, n):
        if n < 0 or self.pos + n > len(self.data):
            self.fail("truncated: need %d more bytes" % n)
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def int(self):
        return struct.unpack(">i", self.take(4))[0]

    def header(self):
        magic = self.take(2)
        if magic != b"X\n":
            if magic in (b"A\n", b"B\n"):
                self.fail("only XDR serialization supported, got %r" % magic)
            self.fail("not an R serialization (magic %r)" % magic)
        version = self.int()
        self.int()  # writer R version
        self.int()  # minimal reader R version
        if version == 3:
            n = self.int()
            if not 0 <= n <= 64:
                self.fail("bad native-encoding length %d" % n)
            self.native_encoding = self.take(n).decode("ascii")
        elif version != 2:
            self.fail("unsupported serialization format version %d" % version)

    def charsxp(self, flags):
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.take(n)
        levels = flags >> 12
        if levels & BYTES_MASK:
            self.fail("CHARSXP marked as bytes; refusing to guess its encoding")
        if levels & LATIN1_MASK:
            enc = "latin-1"
        elif levels & (UTF8_MASK | ASCII_MASK):
            enc = "utf-8"
        else:
            enc = self.native_encoding or "utf-8"
        try:
            return raw.decode(enc)
        except (UnicodeDecodeError, LookupError) as e:
            self.fail("cannot decode string as %s: %s" % (enc, e))

    def attributes(self):
        """Read an attributes pairlist into a dict {name: value}."""
        pl = self.item()
        if not isinstance(pl, list) or not all(isinstance(t, tuple) for t in pl):
            self.fail("attributes are not a pairlist")
        attrs = {}
        for tag, val in pl:
            if tag is None:
                self.fail("untagged attribute")
            attrs[str(tag)] = val
        return attrs

    def item(self):
        flags = self.int()
        t = flags & 0xff
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if t in (NILVALUE_SXP, NILSXP):
            return None
        if t == REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            if not 1 <= idx <= len(self.refs):
                self.fail("bad reference index %d" % idx)
            return self.refs[idx - 1]
        if t == SYMSXP:
            # a symbol is followed by its name as a CHARSXP
            cflags = self.int()
            if cflags & 0xff != CHARSXP:
                self.fail("symbol name is not a CHARSXP (type %d)" % (cflags & 0xff))
            name = self.charsxp(cflags)
            if name is None:
                self.fail("NA symbol name")
            sym = Symbol(name)
            self.refs.append(sym)
            return sym
        if t == LISTSXP:
            # pairlist: walk iteratively; each cell is
            # [attributes] [tag] CAR, then CDR = next cell or 254
            cells = []
            while True:
                if has_attr:
                    self.attributes()  # attributes on a pairlist cell: ignored
                tag = self.item() if has_tag else None
                if tag is not None and not isinstance(tag, Symbol):
                    self.fail("pairlist tag is not a symbol")
                cells.append((tag, self.item()))
                flags = self.int()
                t = flags & 0xff
                if t == NILVALUE_SXP:
                    return cells
                if t != LISTSXP:
                    self.fail("pairlist not terminated by NULL (type %d)" % t)
                has_attr = bool(flags & (1 << 9))
                has_tag = bool(flags & (1 << 10))
        if t == CHARSXP:
            return self.charsxp(flags)

        if t in (LGLSXP, INTSXP):
            n = self.length()
            vals = list(struct.unpack(">%di" % n, self.take(4 * n)))
            vals = [None if v == NA_INTEGER else v for v in vals]
            if t == LGLSXP:
                vals = [None if v is None else bool(v) for v in vals]
            value = vals
        elif t == STRSXP:
            n = self.length()
            value = []
            for _ in range(n):
                cflags = self.int()
                if cflags & 0xff != CHARSXP:
                    self.fail("character vector element is type %d, not CHARSXP"
                              % (cflags & 0xff))
                value.append(self.charsxp(cflags))
        elif t == VECSXP:
            n = self.length()
            value = [self.item() for _ in range(n)]
        else:
            self.fail("unsupported SEXP type %d (flags 0x%x)" % (t, flags))

        if has_attr:
            return RObject(t, value, self.attributes())
        return RObject(t, value, {}) if t == VECSXP else value

    def length(self):
        n = self.int()
        if n == -1:  # long vector: two ints, upper and lower halves
            hi, lo = self.int(), self.int()
            n = (hi << 32) | (lo & 0xffffffff)
        if n < 0 or n > len(self.data):
            self.fail("bad vector length %d" % n)
        return n


def unserialize(data, what):
    r = Reader(data, what)
    r.header()
    obj = r.item()
    if r.pos != len(data):
        raise RdbError("%s: %d trailing bytes after the object"
                       % (what, len(data) - r.pos))
    return obj


def as_plain(obj):
    return obj.value if isinstance(obj, RObject) else obj


def read_index(rdx_path):
    """Return ([(name, offset, length)], compressed) from an .rdx file."""
    with open(rdx_path, "rb") as f:
        raw = f.read()
    try:
        data = zlib.decompress(raw, 47)  # 47: accept gzip or zlib header
    except zlib.error as e:
        raise RdbError("%s: cannot decompress index: %s" % (rdx_path, e))
    idx = unserialize(data, rdx_path)
    if not isinstance(idx, RObject) or idx.rtype != VECSXP or not idx.names():
        raise RdbError("%s: index is not a named list" % rdx_path)
    top = dict(zip(idx.names(), idx.value))
    if "variables" not in top:
        raise RdbError("%s: index has no 'variables' element" % rdx_path)
    var = top["variables"]
    if not isinstance(var, RObject) or var.value and not var.names():
        raise RdbError("%s: 'variables' is not a named list" % rdx_path)
    entries = []
    for name, pos in zip(var.names() or [], var.value):
        pos = as_plain(pos)
        if not isinstance(pos, list) or len(pos) != 2 or None in pos:
            raise RdbError("%s: entry %r is not c(offset, length)" % (rdx_path, name))
        entries.append((name, pos[0], pos[1]))
    comp = as_plain(top.get("compressed", [True]))
    comp = comp[0] if isinstance(comp, list) and comp else comp
    if comp is True:
        comp = 1
    return entries, comp


def read_object(rdb, offset, length, compressed, what):
    if offset < 0 or length < 5 or offset + length > len(rdb):
        raise RdbError("%s: chunk [%d, +%d) outside the .rdb (%d bytes)"
                       % (what, offset, length, len(rdb)))
    chunk = rdb[offset:offset + length]
    ulen = struct.unpack(">I", chunk[:4])[0]
    if compressed != 1:
        raise RdbError("%s: compression type %r not supported (only zlib)"
                       % (what, compressed))
    try:
        data = zlib.decompress(chunk[4:])
    except zlib.error as e:
        raise RdbError("%s: zlib error: %s" % (what, e))
    if len(data) != ulen:
        raise RdbError("%s: inflated to %d bytes, header says %d"
                       % (what, len(data), ulen))
    return unserialize(data, what)


def describe(obj):
    if isinstance(obj, RObject):
        return "%s[%d] attrs=%s" % (TYPE_NAMES.get(obj.rtype, obj.rtype),
                                    len(obj.value), sorted(obj.attrs))
    if isinstance(obj, list):
        return "vector[%d]" % len(obj)
    return type(obj).__name__


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rdb")
    ap.add_argument("names", nargs="*", help="objects to write, in this order")
    ap.add_argument("--rdx", help="index file (default: RDB with .rdx suffix)")
    ap.add_argument("-o", "--out", help="output text file")
    ap.add_argument("--list", action="store_true", help="list the index")
    a = ap.parse_intermixed_args(argv)

    rdx = a.rdx or os.path.splitext(a.rdb)[0] + ".rdx"
    entries, comp = read_index(rdx)
    with open(a.rdb, "rb") as f:
        rdb = f.read()
    index = {name: (off, ln) for name, off, ln in entries}

    if a.list:
        for name, off, ln in entries:
            obj = read_object(rdb, off, ln, comp, "%s[%s]" % (a.rdb, name))
            print("%-20s offset %8d length %8d  %s" % (name, off, ln, describe(obj)))
        return 0
    if not a.names or not a.out:
        ap.error("give -o OUT and at least one object name (or --list)")

    out = []
    for name in a.names:
        if name not in index:
            raise RdbError("%s: no object %r (have: %s)"
                           % (rdx, name, ", ".join(sorted(index))))
        obj = read_object(rdb, index[name][0], index[name][1], comp,
                          "%s[%s]" % (a.rdb, name))
        vec = as_plain(obj)
        if not (isinstance(vec, list) and all(s is None or isinstance(s, str)
                                              for s in vec)):
            raise RdbError("%s: object %r is not a character vector (%s)"
                           % (a.rdb, name, describe(obj)))
        lines = [s for s in vec if s is not None]
        text = "".join(s + "\n" for s in lines)
        nbytes = len(text.encode("utf-8"))
        print("  %-18s %6d lines (%d NA skipped) %9d bytes"
              % (name, len(lines), len(vec) - len(lines), nbytes))
        out.append(text)
    with open(a.out, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(out))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (RdbError, OSError) as e:
        sys.stderr.write("extract_rdb.py: error: %s\n" % e)
        sys.exit(1)
