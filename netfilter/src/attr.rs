// SPDX-License-Identifier: Apache-2.0
//! Netlink attributes (type-length-value, 4-byte aligned): a writer that nests, and a
//! reader over a byte slice.

/// The kernel sets this on nested attributes; nf_tables accepts it either way.
pub const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLA_HDRLEN: usize = 4;

pub const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends attributes to a message buffer.
#[derive(Default)]
pub struct AttrWriter {
    pub buf: Vec<u8>,
    open: Vec<usize>,
}

impl AttrWriter {
    pub fn new() -> AttrWriter {
        AttrWriter::default()
    }

    pub fn bytes(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = NLA_HDRLEN + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
        self
    }

    /// A NUL-terminated string, as the kernel's `NLA_STRING`/`NLA_NUL_STRING` want.
    pub fn str(&mut self, kind: u16, value: &str) -> &mut Self {
        let mut v = value.as_bytes().to_vec();
        v.push(0);
        self.bytes(kind, &v)
    }

    /// nf_tables integers are big-endian.
    pub fn be32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.bytes(kind, &value.to_be_bytes())
    }

    pub fn be64(&mut self, kind: u16, value: u64) -> &mut Self {
        self.bytes(kind, &value.to_be_bytes())
    }

    pub fn be16(&mut self, kind: u16, value: u16) -> &mut Self {
        self.bytes(kind, &value.to_be_bytes())
    }

    pub fn u8(&mut self, kind: u16, value: u8) -> &mut Self {
        self.bytes(kind, &[value])
    }

    /// rtnetlink integers are host-endian.
    pub fn ne32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.bytes(kind, &value.to_ne_bytes())
    }

    pub fn begin(&mut self, kind: u16) -> &mut Self {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn end(&mut self) -> &mut Self {
        let start = self.open.pop().expect("end() without begin()");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// A nested attribute whose content `f` writes.
    pub fn nest(&mut self, kind: u16, f: impl FnOnce(&mut AttrWriter)) -> &mut Self {
        self.begin(kind);
        f(self);
        self.end()
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
}

/// One attribute read back.
#[derive(Clone, Copy, Debug)]
pub struct Attr<'a> {
    pub kind: u16,
    pub value: &'a [u8],
}

impl<'a> Attr<'a> {
    pub fn nested(&self) -> Attrs<'a> {
        Attrs::new(self.value)
    }

    pub fn str(&self) -> String {
        let v = self.value.split(|b| *b == 0).next().unwrap_or_default();
        String::from_utf8_lossy(v).into_owned()
    }

    pub fn be32(&self) -> Option<u32> {
        Some(u32::from_be_bytes(self.value.get(..4)?.try_into().ok()?))
    }

    pub fn be64(&self) -> Option<u64> {
        Some(u64::from_be_bytes(self.value.get(..8)?.try_into().ok()?))
    }

    pub fn be16(&self) -> Option<u16> {
        Some(u16::from_be_bytes(self.value.get(..2)?.try_into().ok()?))
    }

    pub fn ne32(&self) -> Option<u32> {
        Some(u32::from_ne_bytes(self.value.get(..4)?.try_into().ok()?))
    }
}

/// Iterates the attributes in a byte slice; stops at the first malformed one.
#[derive(Clone, Copy, Debug)]
pub struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Attrs<'a> {
    pub fn new(bytes: &'a [u8]) -> Attrs<'a> {
        Attrs { rest: bytes }
    }

    pub fn find(mut self, kind: u16) -> Option<Attr<'a>> {
        Iterator::find(&mut self, |a: &Attr<'a>| a.kind == kind)
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Attr<'a>;

    fn next(&mut self) -> Option<Attr<'a>> {
        if self.rest.len() < NLA_HDRLEN {
            return None;
        }
        let len = u16::from_ne_bytes([self.rest[0], self.rest[1]]) as usize;
        let kind = u16::from_ne_bytes([self.rest[2], self.rest[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > self.rest.len() {
            self.rest = &[];
            return None;
        }
        let value = &self.rest[NLA_HDRLEN..len];
        self.rest = self.rest.get(align4(len)..).unwrap_or_default();
        Some(Attr { kind, value })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Walks every attribute, nested ones too (as far as they parse), to a depth.
    fn walk(attrs: Attrs<'_>, depth: usize, seen: &mut usize) {
        for a in attrs {
            *seen += 1;
            if depth > 0 {
                walk(a.nested(), depth - 1, seen);
            }
            let _ = (a.str(), a.be16(), a.be32(), a.be64(), a.ne32());
        }
    }

    proptest! {
        /// Any bytes, read as attributes, nested or not: no panic, an end, and no
        /// more attributes than 4-byte headers fit.
        #[test]
        fn attributes_of_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut seen = 0;
            walk(Attrs::new(&data), 3, &mut seen);
            let mut top = 0;
            for a in Attrs::new(&data) {
                top += 1;
                prop_assert!(a.value.len() + NLA_HDRLEN <= data.len());
            }
            prop_assert!(top <= data.len() / NLA_HDRLEN);
        }

        /// What the writer writes reads back, value for value; cut short, the reader
        /// stops at the last whole attribute.
        #[test]
        fn written_attributes_read_back(
            values in proptest::collection::vec((1u16..0x3fff, proptest::collection::vec(any::<u8>(), 0..24)), 0..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut w = AttrWriter::new();
            w.nest(1, |w| {
                for (kind, value) in &values {
                    w.bytes(*kind, value);
                }
            });
            let outer: Vec<_> = Attrs::new(&w.buf).collect();
            prop_assert_eq!(outer.len(), 1);
            let inner: Vec<_> = outer[0].nested().map(|a| (a.kind, a.value.to_vec())).collect();
            prop_assert_eq!(&inner, &values);
            let cut = cut.index(w.buf.len() + 1);
            let short: Vec<_> = Attrs::new(&w.buf[NLA_HDRLEN..cut.max(NLA_HDRLEN)]).map(|a| (a.kind, a.value.to_vec())).collect();
            prop_assert!(short.len() <= values.len() && values.starts_with(&short));
        }
    }

    #[test]
    fn nested_attributes_round_trip() {
        let mut w = AttrWriter::new();
        w.str(1, "metadata_guard").nest(2, |w| {
            w.be32(1, 7).u8(2, 3);
        });
        let attrs: Vec<_> = Attrs::new(&w.buf).collect();
        assert_eq!(attrs.len(), 2);
        assert_eq!(attrs[0].str(), "metadata_guard");
        let inner: Vec<_> = attrs[1].nested().collect();
        assert_eq!(inner[0].be32(), Some(7));
        assert_eq!(inner[1].value, &[3]);
        assert_eq!(w.buf.len() % 4, 0);
    }
}
