//! A strict check of a JPEG file's structure and, for sequential (baseline and extended)
//! Huffman-coded files, of its entropy-coded data.
//!
//! The JPEG decoder (zune-jpeg, used through [`folder`](super::folder)) conceals damage:
//! it pads a truncated file with grey and stops decoding a scan as soon as it has all its
//! blocks, wherever that leaves it in the data. A file cut to a third, or with a few
//! hundred flipped bytes, then decodes "fine". [`check`] catches both:
//!
//! * the markers are walked from start-of-image to end-of-image (EOI); a file that ends
//!   before EOI is truncated. Bytes after EOI are allowed (cameras append data there);
//! * every sequential scan is Huffman-decoded block by block (without the inverse DCT):
//!   every code must be in its table, every block must stay within its 64 coefficients,
//!   each restart interval must hold exactly the blocks the frame calls for, and the
//!   data must end where the blocks end (at most one byte of padding), which a stream
//!   desynchronized by a flipped bit essentially never does.
//!
//! Progressive scans get the marker walk only (their data is not decoded here), as do
//! frame types the decoder does not support (it rejects them itself). For every
//! Huffman-coded frame the file must be long enough for one bit per 8x8 block (the
//! shortest DC code): a 373-byte progressive file declaring 5391 x 7681 pixels, which
//! the decoder pads into a 41-megapixel image in seconds, is an error.

/// Bits of a lookahead table entry: codes of up to this many bits decode in one step.
const LOOKAHEAD: u32 = 9;

/// One Huffman table: canonical codes by length, as in the JPEG standard (annex C), plus a
/// [`LOOKAHEAD`]-bit table that decodes the short (common) codes with one lookup.
#[derive(Clone)]
struct Huffman {
    /// Largest code of each length 1..=16 (index = length), or -1 when there is none.
    maxcode: [i32; 17],
    /// Index into `values` of the first code of each length, minus that code.
    valptr: [i32; 17],
    values: Vec<u8>,
    /// For every `LOOKAHEAD`-bit prefix: `(length << 8) | value` of the code it starts
    /// with, or 0 when that code is longer (or the prefix starts no code).
    fast: Box<[u16; 1 << LOOKAHEAD]>,
    /// For an AC table: for every `LOOKAHEAD`-bit prefix whose code and the coefficient
    /// bits after it (`value & 15` of them) both fit in the prefix, their total length;
    /// 0 otherwise. One lookup then decodes a whole coefficient.
    fast_total: Box<[u8; 1 << LOOKAHEAD]>,
}

impl Huffman {
    fn new(counts: &[u8; 16], values: &[u8]) -> Result<Huffman, String> {
        let mut h = Huffman {
            maxcode: [-1; 17],
            valptr: [0; 17],
            values: values.to_vec(),
            fast: Box::new([0; 1 << LOOKAHEAD]),
            fast_total: Box::new([0; 1 << LOOKAHEAD]),
        };
        let (mut code, mut k) = (0i32, 0usize);
        for len in 1..=16 {
            let n = counts[len - 1] as usize;
            if n > 0 {
                h.valptr[len] = k as i32 - code;
                if len as u32 <= LOOKAHEAD {
                    for (c, &v) in (code..code + n as i32).zip(values.get(k..k + n).unwrap_or(&[]))
                    {
                        // Every prefix that starts with this code decodes to it.
                        let shift = LOOKAHEAD - len as u32;
                        let first = (c as usize) << shift;
                        h.fast[first..first + (1 << shift)].fill(((len as u16) << 8) | v as u16);
                    }
                }
                code += n as i32;
                k += n;
                h.maxcode[len] = code - 1;
            }
            if code > (1 << len) {
                return Err("corrupt: a Huffman table has more codes than fit".into());
            }
            code <<= 1;
        }
        for (t, &e) in h.fast_total.iter_mut().zip(h.fast.iter()) {
            let total = (e >> 8) + (e & 15);
            if e != 0 && total <= LOOKAHEAD as u16 {
                *t = total as u8;
            }
        }
        Ok(h)
    }

    /// Decodes one AC symbol `rs` and skips the `rs & 15` coefficient bits after it.
    #[inline]
    fn decode_coefficient(&self, bits: &mut Bits) -> Result<u8, String> {
        let ahead = bits.peek16();
        let i = (ahead >> (16 - LOOKAHEAD)) as usize;
        let t = self.fast_total[i];
        if t != 0 {
            bits.consume(t as u32)?;
            return Ok(self.fast[i] as u8);
        }
        let rs = self.decode(bits)?;
        bits.consume((rs & 15) as u32)?;
        Ok(rs)
    }

    #[inline]
    fn decode(&self, bits: &mut Bits) -> Result<u8, String> {
        let ahead = bits.peek16();
        let e = self.fast[(ahead >> (16 - LOOKAHEAD)) as usize];
        if e != 0 {
            bits.consume((e >> 8) as u32)?;
            return Ok(e as u8);
        }
        for len in LOOKAHEAD as usize + 1..=16 {
            let code = (ahead >> (16 - len)) as i32;
            if code <= self.maxcode[len] {
                bits.consume(len as u32)?;
                let i = (self.valptr[len] + code) as usize;
                return self
                    .values
                    .get(i)
                    .copied()
                    .ok_or_else(|| "corrupt: Huffman code beyond its table".into());
            }
        }
        // Codes of every length were compared: no code starts with these bits. Past the
        // end of the data the missing bits read as zeros; say which it is.
        bits.consume(16)?;
        Err("corrupt: invalid Huffman code in the image data".into())
    }
}

/// Bits of one restart interval's entropy-coded data (byte stuffing already removed), read
/// MSB first through a 64-bit buffer. Reads past the end see zero bits, and consuming them
/// is an error.
struct Bits<'a> {
    data: &'a [u8],
    /// Next byte of `data` to load into `acc`.
    pos: usize,
    /// Buffered bits, left-aligned.
    acc: u64,
    /// Valid bits in `acc` (zero padding past the end counts as valid).
    n: u32,
    /// Bits consumed so far.
    used: usize,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8]) -> Self {
        Bits {
            data,
            pos: 0,
            acc: 0,
            n: 0,
            used: 0,
        }
    }

    /// Loads bytes until at least 57 bits are buffered (zeros past the end).
    #[inline]
    fn refill(&mut self) {
        if let Some(word) = self.data.get(self.pos..self.pos + 8) {
            // Fast path: one 8-byte load, keep the whole bytes that fit (n < 64 here).
            let word = u64::from_be_bytes(word.try_into().expect("8 bytes"));
            let take = (64 - self.n) / 8;
            let keep = self.n + take * 8;
            let mask = if keep >= 64 {
                u64::MAX
            } else {
                !(u64::MAX >> keep)
            };
            self.acc = (self.acc | (word >> self.n)) & mask;
            self.pos += take as usize;
            self.n = keep;
        } else {
            while self.n <= 56 {
                let b = self.data.get(self.pos).copied().unwrap_or(0);
                self.acc |= (b as u64) << (56 - self.n);
                self.pos += 1;
                self.n += 8;
            }
        }
    }

    /// The next 16 bits (zeros past the end), not consumed.
    #[inline(always)]
    fn peek16(&mut self) -> u32 {
        if self.n < 16 {
            self.refill();
        }
        (self.acc >> 48) as u32
    }

    /// Consumes `k <= 32` bits; an error when that goes past the end of the data.
    #[inline(always)]
    fn consume(&mut self, k: u32) -> Result<(), String> {
        if self.n < k {
            self.refill();
        }
        self.acc <<= k;
        self.n -= k;
        self.used += k as usize;
        if self.used > self.data.len() * 8 {
            return Err("corrupt or truncated: the image data ends before its last block".into());
        }
        Ok(())
    }

    /// Bits left after the last block.
    fn left(&self) -> usize {
        self.data.len() * 8 - self.used
    }
}

#[derive(Clone, Copy)]
struct Component {
    id: u8,
    h: usize,
    v: usize,
}

#[derive(Clone)]
struct Frame {
    width: usize,
    height: usize,
    components: Vec<Component>,
    /// Sequential Huffman coding (SOF0, SOF1): the scans are decoded by [`check`].
    sequential: bool,
    /// Largest DC magnitude category (11 for 8-bit samples, 15 for 12-bit).
    max_dc: u8,
}

/// Checks a JPEG file; the message says what is wrong. See the [module](self) docs.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Err("not a JPEG file (no start-of-image marker)".into());
    }
    let truncated = || {
        format!(
            "truncated: the file ends after {} bytes without an end-of-image marker",
            bytes.len()
        )
    };
    let mut dc: [Option<Huffman>; 4] = Default::default();
    let mut ac: [Option<Huffman>; 4] = Default::default();
    let mut frame: Option<Frame> = None;
    let mut restart = 0usize;
    let mut scans = 0usize;
    let mut i = 2;
    loop {
        if i >= bytes.len() {
            return Err(truncated());
        }
        if bytes[i] != 0xFF {
            return Err(format!(
                "corrupt: byte {i} should start a marker (0xFF) but is 0x{:02X}",
                bytes[i]
            ));
        }
        while i < bytes.len() && bytes[i] == 0xFF {
            i += 1;
        }
        let Some(&code) = bytes.get(i) else {
            return Err(truncated());
        };
        i += 1;
        match code {
            0xD9 => {
                return if scans == 0 {
                    Err("corrupt: end-of-image marker before any image data".into())
                } else {
                    Ok(())
                };
            }
            0x01 | 0xD0..=0xD7 => continue, // markers without a length
            0x00 | 0xD8 => {
                return Err(format!(
                    "corrupt: marker 0xFF{code:02X} where a segment should start (byte {})",
                    i - 2
                ))
            }
            _ => {}
        }
        let Some(len) = bytes.get(i..i + 2) else {
            return Err(truncated());
        };
        let len = u16::from_be_bytes([len[0], len[1]]) as usize;
        if len < 2 {
            return Err(format!(
                "corrupt: segment 0xFF{code:02X} has length {len} (byte {})",
                i - 2
            ));
        }
        let Some(seg) = bytes.get(i + 2..i + len) else {
            return Err(truncated());
        };
        i += len;
        let short = || format!("corrupt: segment 0xFF{code:02X} is too short");
        match code {
            0xC4 => {
                // DHT: one or more tables.
                let mut s = seg;
                while !s.is_empty() {
                    let (class, id) = (s[0] >> 4, (s[0] & 15) as usize);
                    let counts: [u8; 16] = s
                        .get(1..17)
                        .ok_or_else(short)?
                        .try_into()
                        .expect("16 bytes");
                    let n: usize = counts.iter().map(|&c| c as usize).sum();
                    let values = s.get(17..17 + n).ok_or_else(short)?;
                    if id > 3 || class > 1 {
                        return Err(format!(
                            "corrupt: Huffman table class {class} id {id} (expected 0/1 and 0..=3)"
                        ));
                    }
                    let t = Some(Huffman::new(&counts, values)?);
                    if class == 0 {
                        dc[id] = t;
                    } else {
                        ac[id] = t;
                    }
                    s = &s[17 + n..];
                }
            }
            0xDD => {
                // DRI
                let r = seg.get(..2).ok_or_else(short)?;
                restart = u16::from_be_bytes([r[0], r[1]]) as usize;
            }
            0xC0..=0xCF if code != 0xC4 && code != 0xC8 && code != 0xCC => {
                // SOFn
                if seg.len() < 6 {
                    return Err(short());
                }
                let height = u16::from_be_bytes([seg[1], seg[2]]) as usize;
                let width = u16::from_be_bytes([seg[3], seg[4]]) as usize;
                let n = seg[5] as usize;
                let comps = seg.get(6..6 + 3 * n).ok_or_else(short)?;
                let components: Vec<Component> = comps
                    .chunks_exact(3)
                    .map(|c| Component {
                        id: c[0],
                        h: (c[1] >> 4) as usize,
                        v: (c[1] & 15) as usize,
                    })
                    .collect();
                if components
                    .iter()
                    .any(|c| !(1..=4).contains(&c.h) || !(1..=4).contains(&c.v))
                {
                    return Err("corrupt: a component's sampling factor is not 1..=4".into());
                }
                if n == 0 || width == 0 {
                    return Err(format!(
                        "corrupt: frame of {width}x{height} with {n} components"
                    ));
                }
                let huffman = matches!(code, 0xC0..=0xC2);
                if huffman && height > 0 {
                    // Every 8x8 block of every component starts with a DC Huffman code of
                    // at least one bit, so a file of N bytes holds at most 8N blocks: a
                    // small file declaring a large image (decoded by padding, seconds of
                    // work for nothing) is cut or corrupt.
                    let hmax = components.iter().map(|c| c.h).max().unwrap_or(1);
                    let vmax = components.iter().map(|c| c.v).max().unwrap_or(1);
                    let blocks: u64 = components
                        .iter()
                        .map(|c| {
                            ((width * c.h).div_ceil(hmax).div_ceil(8)
                                * (height * c.v).div_ceil(vmax).div_ceil(8))
                                as u64
                        })
                        .sum();
                    if (bytes.len() as u64) * 8 < blocks {
                        return Err(format!(
                            "truncated or corrupt: a {width}x{height} image of {blocks} blocks needs at least {} bytes, the file has {}",
                            blocks.div_ceil(8),
                            bytes.len()
                        ));
                    }
                }
                frame = Some(Frame {
                    width,
                    height,
                    components,
                    sequential: code == 0xC0 || code == 0xC1,
                    max_dc: if seg[0] > 8 { 15 } else { 11 },
                });
            }
            0xDA => {
                // SOS, then the entropy-coded data up to the next marker other than a
                // stuffed 0xFF00 or a restart marker.
                scans += 1;
                let start = i;
                loop {
                    match bytes
                        .get(i..)
                        .and_then(|r| r.iter().position(|&b| b == 0xFF))
                    {
                        None => return Err(truncated()),
                        Some(p) => {
                            i += p;
                            match bytes.get(i + 1) {
                                Some(0x00) | Some(0xD0..=0xD7) => i += 2,
                                Some(0xFF) => i += 1,
                                Some(_) => break,
                                None => return Err(truncated()),
                            }
                        }
                    }
                }
                let f = frame
                    .as_ref()
                    .ok_or("corrupt: start of scan before the frame header")?;
                if f.sequential {
                    check_scan(f, seg, &bytes[start..i], restart, &dc, &ac)?;
                }
            }
            _ => {}
        }
    }
}

/// Huffman-decodes one sequential scan: `header` is the SOS segment, `data` the
/// entropy-coded bytes (with stuffing and restart markers) up to the next marker.
fn check_scan(
    f: &Frame,
    header: &[u8],
    data: &[u8],
    restart: usize,
    dc: &[Option<Huffman>; 4],
    ac: &[Option<Huffman>; 4],
) -> Result<(), String> {
    let n = *header
        .first()
        .ok_or("corrupt: empty start-of-scan header")? as usize;
    let sel = header
        .get(1..1 + 2 * n)
        .ok_or("corrupt: start-of-scan header is too short")?;
    if n == 0 || n > 4 {
        return Err(format!("corrupt: a scan of {n} components"));
    }
    // (component, DC table, AC table) for each component of the scan.
    let mut comps = Vec::with_capacity(n);
    for s in sel.chunks_exact(2) {
        let c =
            *f.components.iter().find(|c| c.id == s[0]).ok_or_else(|| {
                format!("corrupt: scan names component {} not in the frame", s[0])
            })?;
        let d = dc[(s[1] >> 4) as usize & 3]
            .as_ref()
            .ok_or("corrupt: a scan uses a DC Huffman table that was not defined")?;
        let a = ac[(s[1] & 15) as usize & 3]
            .as_ref()
            .ok_or("corrupt: a scan uses an AC Huffman table that was not defined")?;
        comps.push((c, d, a));
    }
    let hmax = f.components.iter().map(|c| c.h).max().unwrap_or(1);
    let vmax = f.components.iter().map(|c| c.v).max().unwrap_or(1);
    let height = if f.height == 0 {
        // Height given later by a DNL marker: not checked here.
        return Ok(());
    } else {
        f.height
    };
    // Interleaved scans: MCUs of h x v blocks of each component; a single component:
    // one block per MCU, over that component's own (subsampled) size.
    let (mcus, blocks): (usize, Vec<usize>) = if n == 1 {
        let c = comps[0].0;
        let w = (f.width * c.h).div_ceil(hmax).div_ceil(8);
        let h = (height * c.v).div_ceil(vmax).div_ceil(8);
        (w * h, vec![1])
    } else {
        let w = f.width.div_ceil(8 * hmax);
        let h = height.div_ceil(8 * vmax);
        (w * h, comps.iter().map(|(c, _, _)| c.h * c.v).collect())
    };
    // Split at restart markers and remove the stuffed zero bytes.
    let mut intervals: Vec<Vec<u8>> = vec![Vec::new()];
    let mut j = 0;
    while j < data.len() {
        // Copy the run up to the next 0xFF in one go.
        let run = data[j..]
            .iter()
            .position(|&b| b == 0xFF)
            .unwrap_or(data.len() - j);
        intervals
            .last_mut()
            .expect("one")
            .extend_from_slice(&data[j..j + run]);
        j += run;
        if j < data.len() {
            match data.get(j + 1) {
                Some(0x00) => {
                    intervals.last_mut().expect("one").push(0xFF);
                    j += 2;
                }
                Some(0xD0..=0xD7) => {
                    intervals.push(Vec::new());
                    j += 2;
                }
                _ => j += 1, // fill byte
            }
        }
    }
    if intervals.len() > 1 && intervals.last().is_some_and(|v| v.is_empty()) {
        intervals.pop(); // a restart marker after the last interval
    }
    let per = if restart > 0 { restart } else { mcus };
    let expected = mcus.div_ceil(per.max(1)).max(1);
    if intervals.len() != expected {
        return Err(format!(
            "corrupt: a scan has {} restart intervals where its frame calls for {expected}",
            intervals.len()
        ));
    }
    let mut left = mcus;
    for data in &intervals {
        let count = left.min(per);
        left -= count;
        let mut bits = Bits::new(data);
        for _ in 0..count {
            for (k, (_, d, a)) in comps.iter().enumerate() {
                for _ in 0..blocks[k] {
                    let s = d.decode(&mut bits)?;
                    if s > f.max_dc {
                        return Err(format!("corrupt: DC coefficient category {s}"));
                    }
                    bits.consume(s as u32)?;
                    let mut z = 1;
                    while z < 64 {
                        // The symbol and its coefficient bits (skipped already).
                        let rs = a.decode_coefficient(&mut bits)?;
                        let (r, s) = ((rs >> 4) as usize, (rs & 15) as u32);
                        if s == 0 {
                            if r == 15 {
                                z += 16;
                                if z > 64 {
                                    return Err("corrupt: a block runs past 64 coefficients".into());
                                }
                                continue;
                            }
                            break; // end of block
                        }
                        z += r;
                        if z > 63 || s > 10 + (f.max_dc - 11) as u32 {
                            return Err("corrupt: a block runs past 64 coefficients".into());
                        }
                        z += 1;
                    }
                }
            }
        }
        if bits.left() >= 16 {
            return Err(format!(
                "corrupt: {} bytes of image data left over after the last block of an interval",
                bits.left() / 8
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The standard luminance AC table (JPEG annex K.3): codes of 2 to 16 bits.
    const AC_COUNTS: [u8; 16] = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7d];

    /// Canonical codes `(length, code)` of each value index, as annex C assigns them.
    fn codes(counts: &[u8; 16]) -> Vec<(u32, u32)> {
        let (mut out, mut code) = (Vec::new(), 0u32);
        for (len, &n) in (1..=16).zip(counts) {
            for _ in 0..n {
                out.push((len, code));
                code += 1;
            }
            code <<= 1;
        }
        out
    }

    /// Packs `(length, bits)` fields MSB first, padding the last byte with ones.
    fn pack(fields: &[(u32, u32)]) -> Vec<u8> {
        let (mut out, mut acc, mut n) = (Vec::new(), 0u64, 0u32);
        for &(len, v) in fields {
            acc = (acc << len) | v as u64;
            n += len;
            while n >= 8 {
                out.push((acc >> (n - 8)) as u8);
                n -= 8;
            }
        }
        if n > 0 {
            out.push(((acc << (8 - n)) as u8) | ((1u8 << (8 - n)) - 1));
        }
        out
    }

    /// The lookahead table and the slow path decode every code of a real table, mixed with
    /// raw bits, exactly; reading past the data is an error, not a wrap or a panic.
    #[test]
    fn fast_huffman_decodes_every_code_and_stops_at_the_end() {
        let n: usize = AC_COUNTS.iter().map(|&c| c as usize).sum();
        let values: Vec<u8> = (0..n).map(|i| (i * 37 % 251) as u8).collect();
        let table = Huffman::new(&AC_COUNTS, &values).unwrap();
        let codes = codes(&AC_COUNTS);
        let mut fields = Vec::new();
        let mut want = Vec::new();
        for round in 0..3u32 {
            for (i, &(len, code)) in codes.iter().enumerate() {
                let k = (i as u32 + round) % 12;
                fields.push((len, code));
                fields.push((k, (i as u32 * 2_654_435_761) & ((1 << k) - 1)));
                want.push((values[i], k));
            }
        }
        let data = pack(&fields);
        let mut bits = Bits::new(&data);
        for &(v, k) in &want {
            assert_eq!(table.decode(&mut bits).unwrap(), v);
            bits.consume(k).unwrap();
        }
        assert!(bits.left() < 8, "only the padding is left");
        // Cut the data inside the last code: the decoder must say it ran out.
        let cut = &data[..data.len() - 3];
        let mut bits = Bits::new(cut);
        let mut failed = false;
        for &(_, k) in &want {
            if table.decode(&mut bits).is_err() || bits.consume(k).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "a cut stream must not decode to the end");
        // Coefficients: each code followed by `value & 15` bits, decoded in one step
        // where both fit the lookahead, in two otherwise; both paths must agree.
        let mut fields = Vec::new();
        for (i, &(len, code)) in codes.iter().enumerate() {
            let k = (values[i] & 15) as u32;
            fields.push((len, code));
            fields.push((k, (i as u32 * 40_503) & ((1 << k) - 1)));
        }
        let data = pack(&fields);
        let mut bits = Bits::new(&data);
        for &v in &values {
            assert_eq!(table.decode_coefficient(&mut bits).unwrap(), v);
        }
        assert!(bits.left() < 8, "only the padding is left");
        assert!(
            table.fast_total.iter().any(|&t| t != 0) && table.fast_total.contains(&0),
            "the test covers both paths"
        );
    }
}
