//! JPEG decoding bit-identical to libjpeg-turbo with the settings PIL uses (islow integer
//! IDCT, "fancy" triangle chroma upsampling, fixed-point YCbCr->RGB tables). The `image` crate's
//! decoder differs by up to several levels on 4:2:0 files (it rounds the vertical and horizontal
//! upsampling steps separately). Baseline and progressive Huffman files with 1, 3 or 4 (CMYK, YCCK)
//! components are covered, 4 components converted to RGB as PIL's `convert("RGB")` does; anything else
//! (arithmetic coding, 12-bit, progressive files libjpeg would block-smooth) returns `Ok(None)` and the
//! caller falls back to the `image` crate.

use super::simd::{simd_variants, Level};

/// Decoded pixels: `channels` is 1 (gray, PIL mode "L") or 3 (RGB; a CMYK file as PIL's `convert("RGB")`).
pub struct Decoded {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// 1 or 3.
    pub channels: usize,
    /// Row-major, `channels` bytes a pixel.
    pub pixels: Vec<u8>,
}

/// Why a JPEG could not be decoded.
#[derive(Debug)]
pub enum JpegError {
    /// Larger than the decompression-bomb limit.
    TooManyPixels { width: u32, height: u32 },
    /// Malformed data, with what was wrong.
    Corrupt(String),
}

type R<T> = Result<T, JpegError>;

fn corrupt<T>(msg: &str) -> R<T> {
    Err(JpegError::Corrupt(msg.to_string()))
}

/// Zigzag position -> natural (row-major) position, `jpeg_natural_order`.
const NATURAL: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21,
    28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54,
    47, 55, 62, 63,
];

/// Bits of lookahead in [`Huffman::lut`]: most codes in photos are at most this long.
const LOOKAHEAD: u32 = 9;

/// The flag of [`Huffman::fast_ac`] entries for codes without a value: EOB and ZRL.
const FAST_NO_VALUE: i32 = 1 << 12;

#[derive(Clone)]
struct Huffman {
    maxcode: [i32; 18],
    valptr: [i32; 17],
    mincode: [i32; 17],
    values: Vec<u8>,
    /// For each `LOOKAHEAD`-bit prefix: `length << 8 | value` of the code the bit-by-bit search
    /// ([`Bits::decode_slow`]) finds within those bits, 0 when it needs more.
    lut: Vec<u16>,
    /// For each `LOOKAHEAD`-bit prefix holding an AC code and all of its extra bits: the extended value
    /// `<< 16`, the run `<< 8`, and the bits used (code and extra bits); for EOB (run 0) and ZRL (run 15)
    /// codes [`FAST_NO_VALUE`] is set too (the value is 0); 0 for other prefixes.
    fast_ac: Vec<i32>,
}

impl Huffman {
    fn new(counts: &[u8; 16], values: Vec<u8>) -> Huffman {
        let mut h = Huffman {
            maxcode: [0; 18],
            valptr: [0; 17],
            mincode: [0; 17],
            values,
            lut: vec![0; 1 << LOOKAHEAD],
            fast_ac: vec![0; 1 << LOOKAHEAD],
        };
        let (mut code, mut k) = (0i32, 0i32);
        for len in 1..=16 {
            let n = counts[len - 1] as i32;
            h.valptr[len] = k;
            h.mincode[len] = code;
            code += n;
            k += n;
            h.maxcode[len] = if n > 0 { code - 1 } else { -1 };
            code <<= 1;
        }
        h.maxcode[17] = i32::MAX;
        // The table replays the bit-by-bit search on every prefix, so it agrees with it even on malformed tables.
        for p in 0..1i32 << LOOKAHEAD {
            for len in 1..=LOOKAHEAD as usize {
                let code = p >> (LOOKAHEAD as usize - len);
                if code <= h.maxcode[len] {
                    let i = (h.valptr[len] + code - h.mincode[len]) as usize;
                    h.lut[p as usize] = (len as u16) << 8 | h.values.get(i).copied().unwrap_or(0) as u16;
                    break;
                }
            }
            let e = h.lut[p as usize];
            let (len, rs) = ((e >> 8) as u32, e as u8);
            let (r, size) = ((rs >> 4) as i32, (rs & 15) as u32);
            if e != 0 && size > 0 && len + size <= LOOKAHEAD {
                let extra = (p >> (LOOKAHEAD - len - size)) & ((1 << size) - 1);
                h.fast_ac[p as usize] = extend(extra, size) << 16 | r << 8 | (len + size) as i32;
            } else if e != 0 && size == 0 && (r == 0 || r == 15) {
                h.fast_ac[p as usize] = FAST_NO_VALUE | r << 8 | len as i32;
            }
        }
        h
    }
}

/// Entropy-coded data reader: removes 0xFF00 stuffing; at a marker it feeds zero bits (as libjpeg).
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    n: u32,
    at_marker: bool,
}

impl Bits<'_> {
    fn fill(&mut self) -> R<()> {
        while self.n <= 56 {
            let mut b = 0u8;
            if !self.at_marker {
                match (self.data.get(self.pos), self.data.get(self.pos + 1)) {
                    (None, _) => return corrupt("truncated entropy-coded data"),
                    (Some(0xFF), Some(0)) => {
                        b = 0xFF;
                        self.pos += 2;
                    }
                    (Some(0xFF), _) => self.at_marker = true,
                    (Some(&v), _) => {
                        b = v;
                        self.pos += 1;
                    }
                }
            }
            self.acc |= (b as u64) << (56 - self.n);
            self.n += 8;
        }
        Ok(())
    }

    fn bits(&mut self, count: u32) -> R<i32> {
        if count == 0 {
            return Ok(0);
        }
        if self.n < count {
            self.fill()?;
        }
        let v = (self.acc >> (64 - count)) as i32;
        self.acc <<= count;
        self.n -= count;
        Ok(v)
    }

    #[inline]
    fn decode(&mut self, h: &Huffman) -> R<u8> {
        if self.n < LOOKAHEAD {
            // A failed fill (data ends without a marker) keeps what it read; the slow path then fails
            // only if the code really needs the missing bits, as before.
            let _ = self.fill();
        }
        if self.n >= LOOKAHEAD {
            let e = h.lut[(self.acc >> (64 - LOOKAHEAD)) as usize];
            if e != 0 {
                let len = (e >> 8) as u32;
                self.acc <<= len;
                self.n -= len;
                return Ok(e as u8);
            }
        }
        self.decode_slow(h)
    }

    /// libjpeg's bit-by-bit `jpeg_huff_decode`: codes longer than the lookahead, and the end of data.
    fn decode_slow(&mut self, h: &Huffman) -> R<u8> {
        let mut code = 0i32;
        for len in 1..=16 {
            code = (code << 1) | self.bits(1)?;
            if code <= h.maxcode[len] {
                let i = (h.valptr[len] + code - h.mincode[len]) as usize;
                return Ok(h.values.get(i).copied().unwrap_or(0));
            }
        }
        Ok(0) // libjpeg: "corrupt JPEG data: bad Huffman code", decodes as 0
    }

    /// Restart: drop buffered bits and step over the RSTn marker (skipping garbage like libjpeg).
    fn restart(&mut self) -> R<bool> {
        self.acc = 0;
        self.n = 0;
        self.at_marker = false;
        while self.pos + 1 < self.data.len() {
            if self.data[self.pos] == 0xFF && (0xD0..=0xD7).contains(&self.data[self.pos + 1]) {
                self.pos += 2;
                return Ok(true);
            }
            if self.data[self.pos] == 0xFF && !matches!(self.data[self.pos + 1], 0 | 0xFF) {
                return Ok(false); // another marker: not a well-formed restart
            }
            self.pos += 1;
        }
        corrupt("truncated before a restart marker")
    }
}

fn extend(v: i32, s: u32) -> i32 {
    if s > 0 && v < (1 << (s - 1)) {
        v - (1 << s) + 1
    } else {
        v
    }
}

/// `jpeg_idct_islow` (jidctint.c) with libjpeg-turbo's post-IDCT range-limit table.
fn idct_islow(coef: &[i16; 64], q: &[u16; 64], out: &mut [u8], stride: usize) {
    const CB: u32 = 13;
    const P1: u32 = 2;
    let descale = |x: i64, n: u32| (x + (1i64 << (n - 1))) >> n;
    let range = |v: i64| -> u8 {
        let i = (v as i32 & 1023) as usize;
        match i {
            0..=127 => (i + 128) as u8,
            128..=511 => 255,
            512..=895 => 0,
            _ => (i - 896) as u8,
        }
    };
    // The shared even/odd butterflies; returns the 8 outputs before descaling.
    let butterfly = |s: [i64; 8]| -> [i64; 8] {
        let (z2, z3) = (s[2], s[6]);
        let z1 = (z2 + z3) * 4433;
        let tmp2 = z1 + z3 * -15137;
        let tmp3 = z1 + z2 * 6270;
        let tmp0 = (s[0] + s[4]) << CB;
        let tmp1 = (s[0] - s[4]) << CB;
        let (t10, t13, t11, t12) = (tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2);
        let (mut o0, mut o1, mut o2, mut o3) = (s[7], s[5], s[3], s[1]);
        let (z1, z2, z3, z4) = (o0 + o3, o1 + o2, o0 + o2, o1 + o3);
        let z5 = (z3 + z4) * 9633;
        o0 *= 2446;
        o1 *= 16819;
        o2 *= 25172;
        o3 *= 12299;
        let (z1, z2) = (z1 * -7373, z2 * -20995);
        let (z3, z4) = (z3 * -16069 + z5, z4 * -3196 + z5);
        o0 += z1 + z3;
        o1 += z2 + z4;
        o2 += z2 + z3;
        o3 += z1 + z4;
        [t10 + o3, t11 + o2, t12 + o1, t13 + o0, t13 - o0, t12 - o1, t11 - o2, t10 - o3]
    };
    let mut ws = [0i32; 64];
    for c in 0..8 {
        let s: [i64; 8] = std::array::from_fn(|r| coef[r * 8 + c] as i64 * q[r * 8 + c] as i64);
        let r =
            if s[1..].iter().all(|&v| v == 0) { [s[0] << P1; 8] } else { butterfly(s).map(|v| descale(v, CB - P1)) };
        for (row, v) in r.iter().enumerate() {
            ws[row * 8 + c] = *v as i32;
        }
    }
    for r in 0..8 {
        let s: [i64; 8] = std::array::from_fn(|c| ws[r * 8 + c] as i64);
        let o = &mut out[r * stride..][..8];
        if s[1..].iter().all(|&v| v == 0) {
            o.fill(range(descale(s[0], P1 + 3)));
        } else {
            for (d, v) in o.iter_mut().zip(butterfly(s)) {
                *d = range(descale(v, CB + P1 + 3));
            }
        }
    }
}

struct Component {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    /// Coefficient blocks, `bstride` per row (MCU-padded), kept until EOI as progressive scans refine them.
    coefs: Vec<[i16; 64]>,
    bstride: usize,
    /// libjpeg's `coef_bits` for coefficients 0..10: the last successive-approximation bit, -1 unseen.
    coef_bits: [i32; 10],
    plane: Vec<u8>,
    stride: usize,
}

fn u16_at(d: &[u8], i: usize) -> R<usize> {
    match (d.get(i), d.get(i + 1)) {
        (Some(&a), Some(&b)) => Ok(((a as usize) << 8) | b as usize),
        _ => corrupt("truncated marker segment"),
    }
}

/// Decodes a baseline JPEG; `Ok(None)` for features this decoder leaves to the `image` crate.
pub fn decode(d: &[u8], max_pixels: Option<u64>) -> R<Option<Decoded>> {
    decode_with(Some(Level::current()), d, max_pixels)
}

/// [`decode`] with the kernels compiled for `level`, or (`None`) the reference code they must equal: the
/// i64 IDCT and pixel-by-pixel upsampling and colour conversion.
pub(crate) fn decode_with(level: Option<Level>, d: &[u8], max_pixels: Option<u64>) -> R<Option<Decoded>> {
    if d.get(..2) != Some(&[0xFF, 0xD8]) {
        return corrupt("missing SOI marker");
    }
    let mut pos = 2;
    let mut qt = [[0u16; 64]; 4];
    let (mut dc, mut ac) = (vec![None::<Huffman>; 4], vec![None::<Huffman>; 4]);
    let (mut comps, mut width, mut height, mut restart) = (Vec::<Component>::new(), 0usize, 0usize, 0usize);
    let (mut jfif, mut adobe, mut scanned, mut progressive) = (false, None::<u8>, false, false);
    loop {
        // Next marker: libjpeg skips extraneous bytes and 0xFF fill bytes (with a warning).
        while pos < d.len() && (d[pos] != 0xFF || d.get(pos + 1) == Some(&0xFF)) {
            pos += 1;
        }
        let marker = match (d.get(pos), d.get(pos + 1)) {
            (Some(0xFF), Some(&m)) => m,
            _ => return corrupt("no EOI marker"),
        };
        pos += 2;
        if marker == 0xD9 {
            break;
        }
        if (0xD0..=0xD7).contains(&marker) || marker == 0x01 {
            continue;
        }
        let len = u16_at(d, pos)?;
        let seg = d.get(pos + 2..pos + len).ok_or_else(|| JpegError::Corrupt("truncated segment".into()))?;
        if len < 2 {
            return corrupt("bad segment length");
        }
        match marker {
            0xC0..=0xC2 => {
                if seg.len() < 6 || seg[0] != 8 || !comps.is_empty() {
                    return Ok(None); // 12-bit, or a second frame
                }
                height = u16_at(seg, 1)?;
                width = u16_at(seg, 3)?;
                let n = seg[5] as usize;
                if height == 0 || width == 0 || !(n == 1 || n == 3 || n == 4) || seg.len() < 6 + 3 * n {
                    return Ok(None); // DNL-defined height, 2 components, ...
                }
                if let Some(limit) = max_pixels {
                    if (width * height) as u64 > limit {
                        return Err(JpegError::TooManyPixels { width: width as u32, height: height as u32 });
                    }
                }
                for c in seg[6..6 + 3 * n].chunks_exact(3) {
                    let (h, v, tq) = ((c[1] >> 4) as usize, (c[1] & 15) as usize, c[2] as usize);
                    if !(1..=4).contains(&h) || !(1..=4).contains(&v) || tq > 3 {
                        return corrupt("bad component parameters");
                    }
                    comps.push(Component {
                        id: c[0],
                        h,
                        v,
                        tq,
                        coefs: Vec::new(),
                        bstride: 0,
                        coef_bits: [-1; 10],
                        plane: Vec::new(),
                        stride: 0,
                    });
                }
                let (hmax, vmax) =
                    (comps.iter().map(|c| c.h).max().unwrap_or(1), comps.iter().map(|c| c.v).max().unwrap_or(1));
                let (mcux, mcuy) = (width.div_ceil(8 * hmax), height.div_ceil(8 * vmax));
                for c in &mut comps {
                    c.bstride = mcux * c.h;
                    c.coefs = vec![[0i16; 64]; c.bstride * mcuy * c.v];
                }
                progressive = marker == 0xC2;
            }
            0xC3..=0xCF if ![0xC4, 0xC8, 0xCC].contains(&marker) => return Ok(None), // lossless, hierarchical, arithmetic
            0xC4 => {
                let mut s = seg;
                while s.len() >= 17 {
                    let (class, id) = ((s[0] >> 4) as usize, (s[0] & 15) as usize);
                    let counts: [u8; 16] = std::array::from_fn(|i| s[1 + i]);
                    let total: usize = counts.iter().map(|&c| c as usize).sum();
                    let values =
                        s.get(17..17 + total).ok_or_else(|| JpegError::Corrupt("truncated DHT".into()))?.to_vec();
                    if id > 3 || class > 1 {
                        return corrupt("bad DHT table id");
                    }
                    let t = Some(Huffman::new(&counts, values));
                    if class == 0 {
                        dc[id] = t
                    } else {
                        ac[id] = t
                    }
                    s = &s[17 + total..];
                }
            }
            0xDB => {
                let mut s = seg;
                while !s.is_empty() {
                    let (prec, id) = (s[0] >> 4, (s[0] & 15) as usize);
                    let size = if prec == 0 { 64 } else { 128 };
                    let body = s.get(1..1 + size).ok_or_else(|| JpegError::Corrupt("truncated DQT".into()))?;
                    if id > 3 {
                        return corrupt("bad DQT table id");
                    }
                    for k in 0..64 {
                        qt[id][NATURAL[k]] = if prec == 0 {
                            body[k] as u16
                        } else {
                            ((body[2 * k] as u16) << 8) | body[2 * k + 1] as u16
                        };
                    }
                    s = &s[1 + size..];
                }
            }
            0xDD => restart = u16_at(seg, 0)?,
            0xE0 if seg.starts_with(b"JFIF\0") => jfif = true,
            0xEE if seg.starts_with(b"Adobe") && seg.len() >= 12 => adobe = Some(seg[11]),
            0xDA => {
                pos = scan(d, pos + len, seg, &mut comps, &dc, &ac, restart, (width, height), progressive)?;
                scanned = true;
                continue;
            }
            _ => {}
        }
        pos += len;
    }
    if comps.is_empty() || !scanned {
        return corrupt("no image data");
    }
    // libjpeg smooths blocks of progressive images whose first AC coefficients are not fully
    // refined (`smoothing_ok`); that case is left to the `image` crate.
    if progressive
        && comps.iter().all(|c| c.coef_bits[0] >= 0)
        && comps.iter().any(|c| c.coef_bits[1..].iter().any(|&b| b != 0))
    {
        return Ok(None);
    }
    let mcuy = height.div_ceil(8 * comps.iter().map(|c| c.v).max().unwrap_or(1));
    for c in &mut comps {
        c.stride = c.bstride * 8;
        c.plane = vec![0u8; c.stride * mcuy * c.v * 8];
        match level {
            Some(level) => idct_plane(level, &c.coefs, &qt[c.tq], &mut c.plane, c.bstride),
            None => {
                for (i, block) in c.coefs.iter().enumerate() {
                    let (bx, by) = (i % c.bstride, i / c.bstride);
                    idct_islow(block, &qt[c.tq], &mut c.plane[by * 8 * c.stride + bx * 8..], c.stride);
                }
            }
        }
    }
    Ok(match level {
        Some(level) => finish(level, &comps, width, height, jfif, adobe),
        None => finish_reference(&comps, width, height, jfif, adobe),
    })
}

/// One scan, baseline or progressive (jdhuff.c / jdphuff.c); returns where its data ends.
#[allow(clippy::too_many_arguments)]
fn scan(
    d: &[u8],
    start: usize,
    seg: &[u8],
    comps: &mut [Component],
    dc: &[Option<Huffman>],
    ac: &[Option<Huffman>],
    restart: usize,
    (width, height): (usize, usize),
    progressive: bool,
) -> R<usize> {
    let n = *seg.first().ok_or_else(|| JpegError::Corrupt("empty SOS".into()))? as usize;
    if comps.is_empty() || n == 0 || seg.len() < 4 + 2 * n {
        return corrupt("bad SOS");
    }
    let (ss, se, ah, al) = if progressive {
        let a = seg[3 + 2 * n];
        (seg[1 + 2 * n] as usize, seg[2 + 2 * n] as usize, (a >> 4) as u32, (a & 15) as u32)
    } else {
        (0, 63, 0, 0)
    };
    if se > 63 || ss > se || al > 13 || (progressive && ((ss == 0) != (se == 0) || (ss > 0 && n != 1))) {
        return corrupt("bad progressive scan parameters");
    }
    let table = |t: &[Option<Huffman>], id: usize, needed: bool| -> R<Option<Huffman>> {
        match (needed, t.get(id).and_then(Option::as_ref)) {
            (false, _) => Ok(None),
            (true, Some(h)) => Ok(Some(h.clone())),
            (true, None) => corrupt("SOS uses an undefined Huffman table"),
        }
    };
    let mut sc = Vec::new(); // (component index, dc table, ac table)
    for c in seg[1..1 + 2 * n].chunks_exact(2) {
        let ci = comps
            .iter()
            .position(|x| x.id == c[0])
            .ok_or_else(|| JpegError::Corrupt("SOS names an unknown component".into()))?;
        let need_dc = ss == 0 && ah == 0;
        sc.push((ci, table(dc, (c[1] >> 4) as usize, need_dc)?, table(ac, (c[1] & 15) as usize, se > 0)?));
        // coef_bits bookkeeping for the smoothing check
        for k in ss..=se.min(9) {
            comps[ci].coef_bits[k] = al as i32;
        }
    }
    let (hmax, vmax) = (comps.iter().map(|c| c.h).max().unwrap_or(1), comps.iter().map(|c| c.v).max().unwrap_or(1));
    if sc.len() > 1 && sc.iter().map(|s| comps[s.0].h * comps[s.0].v).sum::<usize>() > 10 {
        return corrupt("sampling factors too large for an interleaved scan"); // libjpeg's limit
    }
    // Block positions (scan component, block x, block y) in decoding order: one block an MCU in a
    // single-component scan, else each component's h x v blocks.
    let single = sc.len() == 1;
    let (bw, bh) = if single {
        let c = &comps[sc[0].0];
        ((width * c.h).div_ceil(hmax).div_ceil(8), (height * c.v).div_ceil(vmax).div_ceil(8))
    } else {
        (width.div_ceil(8 * hmax), height.div_ceil(8 * vmax))
    };
    let sc2: Vec<(usize, usize, usize)> = sc.iter().enumerate().map(|(k, s)| (k, comps[s.0].h, comps[s.0].v)).collect();
    let mut blocks: Vec<(usize, usize, usize)> = Vec::with_capacity(16);
    let mut bits = Bits { data: d, pos: start, acc: 0, n: 0, at_marker: false };
    let mut pred = vec![0i32; sc.len()];
    let mut eobrun = 0u32;
    let (p1, m1) = (1i32 << al, -1i32 << al);
    for m in 0..bw * bh {
        let (mx, my) = (m % bw, m / bw);
        blocks.clear();
        if single {
            blocks.push((0, mx, my));
        } else {
            for &(k, h, v) in &sc2 {
                for y in 0..v {
                    for x in 0..h {
                        blocks.push((k, mx * h + x, my * v + y));
                    }
                }
            }
        }
        if restart > 0 && m > 0 && m % restart == 0 {
            if !bits.restart()? {
                return corrupt("missing restart marker");
            }
            pred.iter_mut().for_each(|p| *p = 0);
            eobrun = 0;
        }
        for &(k, bx, by) in &blocks {
            let (ci, dct, act) = (&sc[k].0, &sc[k].1, &sc[k].2);
            let c = &mut comps[*ci];
            let Some(coef) = c.coefs.get_mut(by * c.bstride + bx) else { return corrupt("block outside the frame") };
            if ss == 0 && ah > 0 {
                // DC refinement: one bit.
                if bits.bits(1)? != 0 {
                    coef[0] |= p1 as i16;
                }
                continue;
            }
            if ss == 0 {
                let Some(dct) = dct else { return corrupt("missing DC table") };
                let s = dc_bits(bits.decode(dct)?)?;
                let diff = extend(bits.bits(s)?, s);
                pred[k] = pred[k].wrapping_add(diff);
                coef[0] = (pred[k] << al) as i16;
                if progressive {
                    continue;
                }
            }
            let Some(act) = act else { return corrupt("missing AC table") };
            let mut i = ss.max(1);
            if ah == 0 {
                // Sequential, or progressive first AC pass (with end-of-band runs).
                if eobrun > 0 {
                    eobrun -= 1;
                    continue;
                }
                while i <= se {
                    if bits.n < LOOKAHEAD {
                        let _ = bits.fill(); // as in `Bits::decode`
                    }
                    if bits.n >= LOOKAHEAD {
                        // A short code with its extra bits: what `decode` then `bits` read, in one look-up.
                        let f = act.fast_ac[(bits.acc >> (64 - LOOKAHEAD)) as usize];
                        if f != 0 {
                            let used = (f & 0xFF) as u32;
                            bits.acc <<= used;
                            bits.n -= used;
                            let r = ((f >> 8) & 15) as usize;
                            if f & FAST_NO_VALUE != 0 {
                                if r == 0 {
                                    break; // EOB (an end-of-band run of 1 when progressive: eobrun stays 0)
                                }
                                i += 16; // ZRL
                                continue;
                            }
                            i += r;
                            coef[NATURAL[i.min(63)]] = ((f >> 16) << al) as i16;
                            i += 1;
                            continue;
                        }
                    }
                    let rs = bits.decode(act)?;
                    let (r, s) = ((rs >> 4) as usize, (rs & 15) as u32);
                    if s > 0 {
                        i += r;
                        let v = extend(bits.bits(s)?, s);
                        coef[NATURAL[i.min(63)]] = (v << al) as i16;
                    } else if r == 15 {
                        i += 15;
                    } else {
                        if progressive {
                            eobrun = (1u32 << r) + bits.bits(r as u32)? as u32 - 1;
                        }
                        break;
                    }
                    i += 1;
                }
                continue;
            }
            // Progressive AC refinement (`decode_mcu_AC_refine`).
            let refine = |coef: &mut [i16; 64], pos: usize, bits: &mut Bits| -> R<()> {
                if coef[pos] != 0 && bits.bits(1)? != 0 && (coef[pos] as i32 & p1) == 0 {
                    coef[pos] = (coef[pos] as i32 + if coef[pos] >= 0 { p1 } else { m1 }) as i16;
                }
                Ok(())
            };
            if eobrun == 0 {
                while i <= se {
                    let rs = bits.decode(act)?;
                    let (mut r, s) = ((rs >> 4) as i32, (rs & 15) as u32);
                    let mut val = 0i32;
                    if s > 0 {
                        val = if bits.bits(1)? != 0 { p1 } else { m1 };
                    } else if r != 15 {
                        eobrun = (1u32 << r) + bits.bits(r as u32)? as u32;
                        break;
                    }
                    while i <= se {
                        let pos = NATURAL[i];
                        if coef[pos] != 0 {
                            refine(coef, pos, &mut bits)?;
                        } else {
                            r -= 1;
                            if r < 0 {
                                break;
                            }
                        }
                        i += 1;
                    }
                    if val != 0 {
                        coef[NATURAL[i.min(63)]] = val as i16;
                    }
                    i += 1;
                }
            }
            if eobrun > 0 {
                while i <= se {
                    refine(coef, NATURAL[i], &mut bits)?;
                    i += 1;
                }
                eobrun -= 1;
            }
        }
    }
    // Continue after the entropy-coded data: the next marker.
    let mut pos = bits.pos;
    while pos + 1 < d.len() && (d[pos] != 0xFF || matches!(d[pos + 1], 0 | 0xFF | 0xD0..=0xD7)) {
        pos += 1;
    }
    Ok(pos)
}

fn dc_bits(s: u8) -> R<u32> {
    if s > 16 {
        return corrupt("bad DC magnitude");
    }
    Ok(s as u32)
}

/// PIL's RGB value of a decoded CMYK channel `v` with black `k` (see [`cmyk_value`]), in floats: C = 255 - v,
/// nk = k, nk - round(C·nk/255) (C·nk/255 is never a half, so the rounding mode does not matter).
fn cmyk_reference(v: u8, k: u8) -> u8 {
    let (c, nk) = (255.0 - v as f64, k as f64);
    (nk - (c * nk / 255.0).round()) as u8
}

/// The reference upsampling and colour conversion, pixel by pixel: what [`finish`] must equal.
fn finish_reference(
    comps: &[Component],
    width: usize,
    height: usize,
    jfif: bool,
    adobe: Option<u8>,
) -> Option<Decoded> {
    let (hmax, vmax) = (comps.iter().map(|c| c.h).max()?, comps.iter().map(|c| c.v).max()?);
    let mut full: Vec<Vec<u8>> = Vec::new();
    for c in comps {
        let (dw, dh) = ((width * c.h).div_ceil(hmax), (height * c.v).div_ceil(vmax));
        let at = |x: usize, y: usize| c.plane[y * c.stride + x] as i32;
        let up = |y: usize| y.saturating_sub(1);
        let down = |y: usize| (y + 1).min(dh - 1);
        let mut out = vec![0u8; width * height];
        let (fx, fy) = (hmax / c.h, vmax / c.v);
        if hmax % c.h != 0 || vmax % c.v != 0 {
            return None;
        }
        for y in 0..height {
            let row = &mut out[y * width..][..width];
            match (fx, fy) {
                (1, 1) => row.iter_mut().enumerate().for_each(|(x, o)| *o = at(x, y) as u8),
                (2, 1) if dw > 2 => {
                    for (x, o) in row.iter_mut().enumerate() {
                        let i = x / 2;
                        *o = match (x % 2, i) {
                            (0, 0) => at(0, y),
                            (0, _) => (3 * at(i, y) + at(i - 1, y) + 1) >> 2,
                            (_, i) if i == dw - 1 => at(i, y),
                            _ => (3 * at(i, y) + at(i + 1, y) + 2) >> 2,
                        } as u8;
                    }
                }
                (1, 2) => {
                    let (r, far, bias) = if y % 2 == 0 { (y / 2, up(y / 2), 1) } else { (y / 2, down(y / 2), 2) };
                    row.iter_mut().enumerate().for_each(|(x, o)| *o = ((3 * at(x, r) + at(x, far) + bias) >> 2) as u8);
                }
                (2, 2) if dw > 2 => {
                    let (r, far) = if y % 2 == 0 { (y / 2, up(y / 2)) } else { (y / 2, down(y / 2)) };
                    let col = |i: usize| 3 * at(i, r) + at(i, far);
                    for (x, o) in row.iter_mut().enumerate() {
                        let i = x / 2;
                        *o = match (x % 2, i) {
                            (0, 0) => (col(0) * 4 + 8) >> 4,
                            (0, _) => (col(i) * 3 + col(i - 1) + 8) >> 4,
                            (_, i) if i == dw - 1 => (col(i) * 4 + 7) >> 4,
                            _ => (col(i) * 3 + col(i + 1) + 7) >> 4,
                        } as u8;
                    }
                }
                // Box replication (`h2v1_upsample`, `h2v2_upsample`, `int_upsample`).
                _ => row.iter_mut().enumerate().for_each(|(x, o)| *o = at(x / fx, y / fy) as u8),
            }
        }
        full.push(out);
    }
    let (w, h) = (width as u32, height as u32);
    if full.len() == 1 {
        return full.pop().map(|pixels| Decoded { width: w, height: h, channels: 1, pixels });
    }
    let color = color_space(comps, jfif, adobe)?;
    let mut pixels = vec![0u8; width * height * 3];
    // build_ycc_rgb_table, SCALEBITS = 16.
    let fix = |x: f64| (x * 65536.0 + 0.5) as i64;
    let half = 1i64 << 15;
    for (i, px) in pixels.chunks_exact_mut(3).enumerate() {
        let [a, b, c] = [full[0][i], full[1][i], full[2][i]];
        let (y, cb, cr) = (a as i64, b as i64 - 128, c as i64 - 128);
        let r = y + ((fix(1.40200) * cr + half) >> 16);
        let g = y + ((-fix(0.34414) * cb + half + -fix(0.71414) * cr) >> 16);
        let b2 = y + ((fix(1.77200) * cb + half) >> 16);
        let ycc = [r.clamp(0, 255) as u8, g.clamp(0, 255) as u8, b2.clamp(0, 255) as u8];
        // PIL's RGB of CMYK in floats, rounded: exactly `cmyk_value`'s integers (checked on every input in the
        // tests), so the two paths stay independent.
        let cmyk = |v: u8| cmyk_reference(v, full[3][i]);
        px.copy_from_slice(&match color {
            // (Gray has one plane and returned above.)
            Color::Gray | Color::Rgb => [a, b, c],
            Color::YCbCr => ycc,
            Color::Cmyk => [cmyk(a), cmyk(b), cmyk(c)],
            Color::Ycck => ycc.map(|v| cmyk(255 - v)),
        });
    }
    Some(Decoded { width: w, height: h, channels: 3, pixels })
}

/// The IDCT of every block of a component into its plane (`bstride` blocks a row, 8 pixels each).
#[inline(always)]
fn idct_plane_generic(blocks: &[[i16; 64]], q: &[u16; 64], plane: &mut [u8], bstride: usize) {
    let stride = bstride * 8;
    for (i, block) in blocks.iter().enumerate() {
        let (bx, by) = (i % bstride, i / bstride);
        let out = &mut plane[by * 8 * stride + bx * 8..];
        if !idct_islow_i32(block, q, out, stride) {
            idct_islow(block, q, out, stride);
        }
    }
}

simd_variants! { fn idct_plane(blocks: &[[i16; 64]], q: &[u16; 64], plane: &mut [u8], bstride: usize) = idct_plane_generic; }

/// Largest |input| of [`butterfly8`] for which no i32 overflows: the butterfly's outputs are at most
/// 178219 times its largest input, and 178219 * 12000 + 2^17 (the final rounding) < 2^31.
const I32_SAFE: i32 = 12000;

/// [`idct_islow`]'s butterfly on 8 independent lanes (columns in pass 1, rows in pass 2), in i32:
/// `s[k][lane]` is input k of a lane's 1-D transform; returns its 8 outputs before descaling.
#[inline(always)]
fn butterfly8(s: &[[i32; 8]; 8]) -> [[i32; 8]; 8] {
    const CB: u32 = 13;
    let mut o = [[0i32; 8]; 8];
    for l in 0..8 {
        let (z2, z3) = (s[2][l], s[6][l]);
        let z1 = (z2 + z3) * 4433;
        let tmp2 = z1 + z3 * -15137;
        let tmp3 = z1 + z2 * 6270;
        let tmp0 = (s[0][l] + s[4][l]) << CB;
        let tmp1 = (s[0][l] - s[4][l]) << CB;
        let (t10, t13, t11, t12) = (tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2);
        let (mut o0, mut o1, mut o2, mut o3) = (s[7][l], s[5][l], s[3][l], s[1][l]);
        let (z1, z2, z3, z4) = (o0 + o3, o1 + o2, o0 + o2, o1 + o3);
        let z5 = (z3 + z4) * 9633;
        o0 *= 2446;
        o1 *= 16819;
        o2 *= 25172;
        o3 *= 12299;
        let (z1, z2) = (z1 * -7373, z2 * -20995);
        let (z3, z4) = (z3 * -16069 + z5, z4 * -3196 + z5);
        o0 += z1 + z3;
        o1 += z2 + z4;
        o2 += z2 + z3;
        o3 += z1 + z4;
        let r = [t10 + o3, t11 + o2, t12 + o1, t13 + o0, t13 - o0, t12 - o1, t11 - o2, t10 - o3];
        for k in 0..8 {
            o[k][l] = r[k];
        }
    }
    o
}

/// libjpeg-turbo's range limit of a descaled IDCT output `x` (`(x + 128) & 1023` into its table), without the table.
#[inline(always)]
fn range_limit(x: i32) -> u8 {
    let t = ((x + 128) & 1023) as u32;
    if t < 256 {
        t as u8
    } else if t < 640 {
        255
    } else {
        0
    }
}

/// [`idct_islow`] in i32, 8 lanes at a time; `false` (nothing written) when an input is too large for
/// i32 to be exact, which only corrupt or adversarial data reaches. Equal to `idct_islow` otherwise: its
/// all-zero-AC shortcuts give what the full butterfly gives.
#[inline(always)]
fn idct_islow_i32(coef: &[i16; 64], q: &[u16; 64], out: &mut [u8], stride: usize) -> bool {
    // All AC zero (common in chroma): the two butterflies below give one value, computed the same way.
    if coef[1..].iter().fold(0, |a, &c| a | c) == 0 {
        let v = coef[0] as i32 * q[0] as i32;
        if v.abs() > I32_SAFE {
            return false;
        }
        let w = ((v << 13) + (1 << 10)) >> 11; // pass 1: every row of column 0
        if w.abs() > I32_SAFE {
            return false;
        }
        let px = range_limit(((w << 13) + (1 << 17)) >> 18); // pass 2: every output
        for r in 0..8 {
            out[r * stride..][..8].fill(px);
        }
        return true;
    }
    let mut s = [[0i32; 8]; 8];
    let mut m = 0i32;
    for r in 0..8 {
        for c in 0..8 {
            let v = coef[r * 8 + c] as i32 * q[r * 8 + c] as i32; // |v| < 2^31: i16 * u16
            s[r][c] = v;
            m = m.max(v.abs());
        }
    }
    if m > I32_SAFE {
        return false;
    }
    let y = butterfly8(&s);
    // Pass 2 takes rows: ws[c][r] is row r's input c.
    let mut ws = [[0i32; 8]; 8];
    let mut m = 0i32;
    for r in 0..8 {
        for c in 0..8 {
            let v = (y[r][c] + (1 << 10)) >> 11;
            ws[c][r] = v;
            m = m.max(v.abs());
        }
    }
    if m > I32_SAFE {
        return false;
    }
    let z = butterfly8(&ws);
    for r in 0..8 {
        let o = &mut out[r * stride..][..8];
        for c in 0..8 {
            o[c] = range_limit((z[c][r] + (1 << 17)) >> 18);
        }
    }
    true
}

/// libjpeg's fancy upsampling of one row by 2 horizontally (`h2v1_fancy_upsample`), `input.len() > 2`;
/// writes `2 * input.len()` values.
#[inline(always)]
fn h2v1_row(input: &[u8], out: &mut [u8]) {
    let n = input.len();
    let out = &mut out[..2 * n];
    out[0] = input[0];
    out[1] = ((3 * input[0] as u16 + input[1] as u16 + 2) >> 2) as u8;
    for (o, w) in out[2..2 * n - 2].chunks_exact_mut(2).zip(input.windows(3)) {
        let (a, b, c) = (w[0] as u16, 3 * w[1] as u16, w[2] as u16);
        o[0] = ((b + a + 1) >> 2) as u8;
        o[1] = ((b + c + 2) >> 2) as u8;
    }
    out[2 * n - 2] = ((3 * input[n - 1] as u16 + input[n - 2] as u16 + 1) >> 2) as u8;
    out[2 * n - 1] = input[n - 1];
}

/// The horizontal half of `h2v2_fancy_upsample` on column sums `3 * near + far`, `cs.len() > 2`.
#[inline(always)]
fn h2v2_row(cs: &[u16], out: &mut [u8]) {
    let n = cs.len();
    let out = &mut out[..2 * n];
    out[0] = ((cs[0] * 4 + 8) >> 4) as u8;
    out[1] = ((cs[0] * 3 + cs[1] + 7) >> 4) as u8;
    for (o, w) in out[2..2 * n - 2].chunks_exact_mut(2).zip(cs.windows(3)) {
        let b = 3 * w[1];
        o[0] = ((b + w[0] + 8) >> 4) as u8;
        o[1] = ((b + w[2] + 7) >> 4) as u8;
    }
    out[2 * n - 2] = ((cs[n - 1] * 3 + cs[n - 2] + 8) >> 4) as u8;
    out[2 * n - 1] = ((cs[n - 1] * 4 + 7) >> 4) as u8;
}

/// Row `y` of component `c` upsampled to the image's width (jdsample.c), into `row`.
#[inline(always)]
fn upsample_row(
    c: &Component,
    (hmax, vmax): (usize, usize),
    (width, height): (usize, usize),
    y: usize,
    row: &mut [u8],
    cs: &mut [u16],
) {
    let (fx, fy) = (hmax / c.h, vmax / c.v);
    let (dw, dh) = ((width * c.h).div_ceil(hmax), (height * c.v).div_ceil(vmax));
    let line = |yy: usize| &c.plane[yy * c.stride..][..dw];
    match (fx, fy) {
        (1, 1) => row[..width].copy_from_slice(&line(y)[..width]),
        (2, 1) if dw > 2 => h2v1_row(line(y), row),
        (1, 2) | (2, 2) => {
            let (near, far, bias) =
                if y % 2 == 0 { (y / 2, (y / 2).saturating_sub(1), 1) } else { (y / 2, (y / 2 + 1).min(dh - 1), 2) };
            let (near, far) = (line(near), line(far));
            if fx == 1 {
                for ((o, &a), &b) in row[..width].iter_mut().zip(near).zip(far) {
                    *o = ((3 * a as u16 + b as u16 + bias) >> 2) as u8;
                }
            } else if dw > 2 {
                for ((s, &a), &b) in cs[..dw].iter_mut().zip(near).zip(far) {
                    *s = 3 * a as u16 + b as u16;
                }
                h2v2_row(&cs[..dw], row);
            } else {
                let src = line(y / fy);
                row[..width].iter_mut().enumerate().for_each(|(x, o)| *o = src[x / fx]);
            }
        }
        // Box replication (`h2v1_upsample`, `h2v2_upsample`, `int_upsample`).
        _ => {
            let src = line(y / fy);
            row[..width].iter_mut().enumerate().for_each(|(x, o)| *o = src[x / fx]);
        }
    }
}

/// jdcolor.c's `ycc_rgb_convert` for one row (SCALEBITS = 16; exact in i32).
#[inline(always)]
fn ycc_row(y: &[u8], cb: &[u8], cr: &[u8], out: &mut [u8]) {
    const FIX_R: i32 = 91881; // FIX(1.40200)
    const FIX_G_CB: i32 = 22554; // FIX(0.34414)
    const FIX_G_CR: i32 = 46802; // FIX(0.71414)
    const FIX_B: i32 = 116130; // FIX(1.77200)
    const HALF: i32 = 1 << 15;
    for (((px, &y), &cb), &cr) in out.chunks_exact_mut(3).zip(y).zip(cb).zip(cr) {
        let (y, cb, cr) = (y as i32, cb as i32 - 128, cr as i32 - 128);
        let r = y + ((FIX_R * cr + HALF) >> 16);
        let g = y + ((-FIX_G_CB * cb + HALF - FIX_G_CR * cr) >> 16);
        let b = y + ((FIX_B * cb + HALF) >> 16);
        px[0] = r.clamp(0, 255) as u8;
        px[1] = g.clamp(0, 255) as u8;
        px[2] = b.clamp(0, 255) as u8;
    }
}

/// PIL's `convert("RGB")` of a CMYK pixel value for one channel: `v` is the decoded (Adobe-inverted)
/// C, M or Y and `k` the decoded K. PIL reads them as "CMYK;I" (255 - v, 255 - k), then Convert.c's
/// `cmyk2rgb`: nk - MULDIV255(C, nk) with nk = 255 - K = k.
#[inline(always)]
fn cmyk_value(v: u8, k: u8) -> u8 {
    let (c, nk) = (255 - v as i32, k as i32);
    let t = c * nk + 128;
    (nk - (((t >> 8) + t) >> 8)) as u8
}

/// Four rows (C, M, Y, K, or Y, Cb, Cr, K when `ycck`) to RGB as PIL gives them. For YCCK, libjpeg's
/// `ycck_cmyk_convert` outputs 255 - (the YCbCr triple as RGB), so its RGB goes through [`cmyk_value`] inverted.
#[inline(always)]
fn cmyk_row(a: &[u8], b: &[u8], c: &[u8], k: &[u8], ycck: bool, out: &mut [u8]) {
    if ycck {
        ycc_row(a, b, c, out);
        for (px, &k) in out.chunks_exact_mut(3).zip(k) {
            px.iter_mut().for_each(|v| *v = cmyk_value(255 - *v, k));
        }
    } else {
        for ((((px, &a), &b), &c), &k) in out.chunks_exact_mut(3).zip(a).zip(b).zip(c).zip(k) {
            px.copy_from_slice(&[cmyk_value(a, k), cmyk_value(b, k), cmyk_value(c, k)]);
        }
    }
}

/// Upsampling and colour conversion of the whole image, row by row (no full-size intermediate planes).
#[inline(always)]
fn convert_generic(comps: &[Component], (width, height): (usize, usize), color: Color, pixels: &mut [u8]) {
    let hmax = comps.iter().map(|c| c.h).max().unwrap_or(1);
    let vmax = comps.iter().map(|c| c.v).max().unwrap_or(1);
    let channels = color.channels();
    // Rows hold the full upsampled width of the widest MCU-padded component.
    let row_len = comps.iter().map(|c| c.stride * hmax / c.h).max().unwrap_or(0).max(width) + 16;
    let mut rows = vec![vec![0u8; row_len]; comps.len()];
    let mut cs = vec![0u16; row_len];
    for (y, out) in pixels.chunks_exact_mut(width * channels).enumerate().take(height) {
        for (c, row) in comps.iter().zip(rows.iter_mut()) {
            upsample_row(c, (hmax, vmax), (width, height), y, row, &mut cs);
        }
        match (&rows[..], color) {
            ([g], _) => out.copy_from_slice(&g[..width]),
            ([a, b, c], Color::Rgb) => {
                for (((px, &a), &b), &c) in out.chunks_exact_mut(3).zip(&a[..width]).zip(&b[..width]).zip(&c[..width]) {
                    px.copy_from_slice(&[a, b, c]);
                }
            }
            ([a, b, c], _) => ycc_row(&a[..width], &b[..width], &c[..width], out),
            ([a, b, c, k], _) => {
                cmyk_row(&a[..width], &b[..width], &c[..width], &k[..width], color == Color::Ycck, out)
            }
            _ => {}
        }
    }
}

simd_variants! { fn convert(comps: &[Component], size: (usize, usize), color: Color, pixels: &mut [u8]) = convert_generic; }

/// The colour space of the components (jdapimin.c's `default_decompress_parms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Color {
    Gray,
    Rgb,
    YCbCr,
    Cmyk,
    Ycck,
}

impl Color {
    /// Channels of the output: 1 for gray, else 3 (RGB).
    fn channels(self) -> usize {
        if self == Color::Gray {
            1
        } else {
            3
        }
    }
}

/// libjpeg's guess of the colour space: JFIF means YCbCr, then the Adobe transform, then the component ids;
/// `None` for big-gamut YCC (JPEG XT), left to the `image` crate.
fn color_space(comps: &[Component], jfif: bool, adobe: Option<u8>) -> Option<Color> {
    let ids: Vec<u8> = comps.iter().map(|c| c.id).collect();
    Some(match comps.len() {
        1 => Color::Gray,
        3 if jfif => Color::YCbCr,
        3 => match adobe {
            Some(0) => Color::Rgb,
            Some(_) => Color::YCbCr,
            None if ids == [b'R', b'G', b'B'] => Color::Rgb,
            None if ids == [1, 34, 35] => return None,
            None => Color::YCbCr,
        },
        4 => match adobe {
            Some(0) | None => Color::Cmyk,
            Some(_) => Color::Ycck,
        },
        _ => return None,
    })
}

/// Upsampling (jdsample.c) and color conversion (jdcolor.c) to the final pixels; `None` for what the
/// `image` crate is left to decode (non-integral sampling ratios, big-gamut YCC).
fn finish(
    level: Level,
    comps: &[Component],
    width: usize,
    height: usize,
    jfif: bool,
    adobe: Option<u8>,
) -> Option<Decoded> {
    let (hmax, vmax) = (comps.iter().map(|c| c.h).max()?, comps.iter().map(|c| c.v).max()?);
    if comps.iter().any(|c| hmax % c.h != 0 || vmax % c.v != 0) {
        return None;
    }
    let color = color_space(comps, jfif, adobe)?;
    let mut pixels = vec![0u8; width * height * color.channels()];
    convert(level, comps, (width, height), color, &mut pixels);
    Some(Decoded { width: width as u32, height: height as u32, channels: color.channels(), pixels })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so the tests need no crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn range(&mut self, lo: i64, hi: i64) -> i64 {
            lo + (self.next() % (hi - lo + 1) as u64) as i64
        }
    }

    /// The i32 IDCT against the i64 reference on random blocks, sparse and dense, small and at the edge of
    /// its range (where it declines), and the per-level plane kernels against the reference.
    #[test]
    fn idct_i32_and_simd_match_reference_on_random_blocks() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (mut fast, mut declined) = (0, 0);
        for round in 0..4000 {
            let mut coef = [0i16; 64];
            let mut q = [0u16; 64];
            let (cmax, qmax) = match round % 4 {
                0 => (8, 16),
                1 => (200, 60),
                2 => (1023, 255),
                _ => (32767, 65535),
            };
            let nonzero = rng.range(1, 64);
            for k in 0..64 {
                q[k] = rng.range(1, qmax) as u16;
                if rng.range(0, 63) < nonzero {
                    coef[k] = rng.range(-cmax, cmax) as i16;
                }
            }
            if round % 7 == 0 {
                coef[1..].fill(0); // DC only: the reference's shortcut
            }
            let (mut want, mut got) = ([0u8; 80], [0u8; 80]);
            idct_islow(&coef, &q, &mut want, 10);
            if idct_islow_i32(&coef, &q, &mut got, 10) {
                fast += 1;
                assert_eq!(want, got, "round {round}: {coef:?} {q:?}");
            } else {
                declined += 1;
            }
        }
        assert!(fast > 1000 && declined > 100, "{fast} fast, {declined} declined");
        // Whole planes of random blocks, every level.
        let blocks: Vec<[i16; 64]> =
            (0..24).map(|_| std::array::from_fn(|k| if k < 20 { rng.range(-300, 300) as i16 } else { 0 })).collect();
        let q: [u16; 64] = std::array::from_fn(|k| 1 + (k as u16 % 20));
        let mut want = vec![0u8; 24 * 64];
        for (i, b) in blocks.iter().enumerate() {
            idct_islow(b, &q, &mut want[(i / 6) * 8 * 48 + (i % 6) * 8..], 48);
        }
        for level in Level::available() {
            let mut got = vec![0u8; 24 * 64];
            idct_plane(level, &blocks, &q, &mut got, 6);
            assert_eq!(want, got, "{level:?}");
        }
    }

    /// Whole files (baseline and progressive; 4:4:4, 4:2:2, 4:2:0, 4:4:0, 4:1:1, mixed factors; gray;
    /// Adobe RGB; CMYK and YCCK; restarts; odd sizes) decoded with every level against the reference code.
    #[test]
    fn every_level_decodes_files_like_the_reference() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/processor/");
        let mut files: Vec<String> = std::fs::read_dir(format!("{dir}jpeg"))
            .unwrap()
            .map(|e| e.unwrap().path().display().to_string())
            .filter(|p| p.ends_with(".jpg"))
            .collect();
        files.extend(["images/coffee_q90.jpg", "images/chelsea_q90_444.jpg"].map(|f| format!("{dir}{f}")));
        files.sort();
        assert!(files.len() >= 11, "{files:?}");
        for f in &files {
            let bytes = std::fs::read(f).unwrap();
            let want = decode_with(None, &bytes, None).unwrap().unwrap();
            for level in Level::available() {
                let got = decode_with(Some(level), &bytes, None).unwrap().unwrap();
                assert_eq!((got.width, got.height, got.channels), (want.width, want.height, want.channels), "{f}");
                assert!(got.pixels == want.pixels, "{f}: {level:?} differs from the reference");
            }
        }
    }

    /// The integer CMYK conversion (Pillow's MULDIV255) equals the float formula on every input.
    #[test]
    fn cmyk_integer_conversion_matches_float_formula() {
        for v in 0..=255u8 {
            for k in 0..=255u8 {
                assert_eq!(cmyk_value(v, k), cmyk_reference(v, k), "v {v} k {k}");
            }
        }
    }

    /// The lookahead table agrees with the bit-by-bit search on every prefix, for a table with codes
    /// longer than the lookahead.
    #[test]
    fn huffman_lookahead_matches_bitwise_search() {
        let mut counts = [0u8; 16];
        counts[1] = 2;
        counts[2] = 3;
        counts[8] = 4;
        counts[11] = 30;
        // Symbols 0..39, then AC symbols with EOB, ZRL and extra bits of every size up to 8.
        let tables = [
            (0..39).collect::<Vec<u8>>(),
            (0..39).map(|k| [0xF0, 0x00, 0x01, 0x12, 0x23, 0x34, 0x45, 0x56, 0x67, 0x78, 0x08, 0xF1][k % 12]).collect(),
        ];
        let mut fast = 0;
        for values in tables {
            let h = Huffman::new(&counts, values);
            for p in 0u32..1 << 16 {
                let data: Vec<u8> = vec![(p >> 8) as u8, p as u8, 0x12, 0x34, 0x56, 0x78, 0x9A, 0xBC, 0, 0, 0, 0];
                let data: Vec<u8> =
                    data.iter().flat_map(|&b| if b == 0xFF { vec![0xFF, 0] } else { vec![b] }).collect();
                let mut a = Bits { data: &data, pos: 0, acc: 0, n: 0, at_marker: false };
                let mut b = Bits { data: &data, pos: 0, acc: 0, n: 0, at_marker: false };
                let rs = b.decode_slow(&h).unwrap();
                assert_eq!(a.decode(&h).unwrap(), rs, "{p:016b}");
                assert_eq!((a.acc, a.n), (b.acc, b.n), "{p:016b}");
                // The combined AC entry: what `decode` then `bits` read, and as many bits.
                let f = h.fast_ac[(p >> (16 - LOOKAHEAD)) as usize];
                if f != 0 {
                    fast += 1;
                    let (r, size) = ((rs >> 4) as i32, (rs & 15) as u32);
                    let v = extend(b.bits(size).unwrap(), size);
                    assert_eq!(((f >> 8) & 15, f & FAST_NO_VALUE != 0, f >> 16), (r, size == 0, v), "{p:016b}");
                    assert!(size > 0 || r == 0 || r == 15, "{p:016b}");
                    let mut c = Bits { data: &data, pos: 0, acc: 0, n: 0, at_marker: false };
                    c.fill().unwrap();
                    c.acc <<= f & 0xFF;
                    c.n -= (f & 0xFF) as u32;
                    assert_eq!((c.acc, c.n), (b.acc, b.n), "{p:016b}");
                }
            }
        }
        assert!(fast > 10_000, "{fast}");
    }
}
