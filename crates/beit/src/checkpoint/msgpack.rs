//! Safe reader for Flax checkpoints (`flax_model.msgpack`), as transformers' `FlaxPreTrainedModel.save_pretrained`
//! writes them: `flax.serialization.to_bytes(params)`, a msgpack map of maps whose leaves are arrays.
//!
//! Layout (flax/serialization.py): each array is a msgpack ext of type 1 (`_MsgpackExtType.ndarray`) whose payload
//! is itself msgpack: `[shape (array of ints), dtype name (str, e.g. "float32"), data (bin, C order, little-endian)]`.
//! Ext type 3 (`npscalar`) has the same payload and holds a numpy scalar. Arrays over 2^30 bytes are split by
//! `_chunk` into `{"__msgpack_chunked_array__": true, "shape": {"0": d0, ...}, "chunks": {"0": <1-D array>, ...}}`,
//! joined back here as `_unchunk` does. transformers writes the params dict itself (no `{"params": ...}` wrapper);
//! models with BatchNorm state write `{"params": ..., "batch_stats": ...}`.
//!
//! [`read_flax_as_pytorch`] then renames and transposes the leaves as transformers 4.57.6's
//! `load_flax_weights_in_pytorch_model` (modeling_flax_pytorch_utils.py) does before loading them into a PyTorch
//! model, so the names are PyTorch state-dict names.
//!
//! The input is untrusted (and fuzzed): the decoder never panics, never allocates from a declared length without
//! checking the bytes are there, and bounds nesting depth and entry count.

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::pickle::{PtDtype, RawTensor};

/// Every error names the file and says what was expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum MsgpackError {
    /// The file could not be read.
    #[error("{}: cannot read file: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The bytes are not well-formed msgpack (truncated, corrupted, or over a limit).
    #[error("{}: msgpack at byte {offset}: {msg}", .path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// Byte offset of the failure.
        offset: usize,
        /// What was wrong.
        msg: String,
    },
    /// Well-formed msgpack that is not a Flax parameter tree.
    #[error("{}: {msg}", .path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
}

type Tensors = Vec<(String, RawTensor)>;

// Caps, far above what real checkpoints use: they keep hostile files bounded.
const MAX_DEPTH: usize = 64; // msgpack nesting (maps, arrays, ext payloads)
const MAX_NDIM: usize = 64; // numpy's own limit
const MAX_ENTRIES: usize = 1 << 18; // map entries in the whole file (BEiT-large has ~1,000)

/// Raw Flax parameters: flattened names joined with '.', e.g.
/// "beit.encoder.layer.0.attention.attention.query.kernel", in Flax layout and dtype (what
/// `flatten_dict(msgpack_restore(bytes))` gives), in file order.
pub fn read_flax_msgpack(path: &Path) -> Result<Vec<(String, RawTensor)>, MsgpackError> {
    let bytes = read_file(path)?;
    decode_flax_msgpack(path, &bytes)
}

/// The same, renamed and transposed to PyTorch's names and layouts as transformers'
/// `load_flax_weights_in_pytorch_model` does it (see [`decode_flax_as_pytorch`] for the rules).
pub fn read_flax_as_pytorch(path: &Path) -> Result<Vec<(String, RawTensor)>, MsgpackError> {
    let bytes = read_file(path)?;
    decode_flax_as_pytorch(path, &bytes)
}

/// [`read_flax_msgpack`] on bytes already in memory; `origin` only names them in errors.
pub fn decode_flax_msgpack(
    origin: &Path,
    bytes: &[u8],
) -> Result<Vec<(String, RawTensor)>, MsgpackError> {
    let state = decode_state(origin, bytes)?;
    let mut out = Vec::with_capacity(state.leaves.len());
    for (key, t) in state.leaves {
        out.push((key.join("."), t));
    }
    check_unique(origin, &out)?;
    Ok(out)
}

/// [`read_flax_as_pytorch`] on bytes already in memory; `origin` only names them in errors.
///
/// Rules, in transformers' order (`load_flax_weights_in_pytorch_model`, transformers 4.57.6):
/// 1. If any leaf is bfloat16, every bfloat16 leaf becomes float32 ("torch.from_numpy can-not handle bf16");
///    other dtypes are kept (float16 stays float16; `load_state_dict` casts to the model's dtype later).
/// 2. `kernel` of rank 4 (Conv, (kh, kw, in, out)) -> `weight`, transposed (3, 2, 0, 1) to (out, in, kh, kw).
/// 3. any other `kernel` (Dense, (in, out)) -> `weight`, numpy `.T`: every axis reversed ((out, in) for rank 2).
/// 4. `scale` (LayerNorm) and `embedding` (Embed) -> `weight`.
/// 5. a last name containing "mean" -> `running_mean`, else one containing "var" -> `running_var` (BatchNorm).
/// 6. if the top level has a `batch_stats` key, the first name component (`params` / `batch_stats`) is dropped.
///
/// transformers skips rules 2 and 3 when the PyTorch model itself has a parameter named `...kernel`; no PyTorch
/// BEiT class has one, so `kernel` is always renamed here. Its weight-norm renaming (`*_g`/`*_v` to
/// `parametrizations.*.original0/1`) depends on the PyTorch model's names and is not done (BEiT has none).
/// The base model prefix is not touched: names are those of the Flax class that saved the file, which equal
/// the state-dict names of the matching PyTorch class (`FlaxBeitModel` -> `BeitModel`: `embeddings...`;
/// `FlaxBeitForImageClassification` -> `BeitForImageClassification`: `beit.embeddings...`, `classifier...`).
/// Loading into another class needs transformers' prefix handling (strip or add `beit.`), which the caller does.
pub fn decode_flax_as_pytorch(
    origin: &Path,
    bytes: &[u8],
) -> Result<Vec<(String, RawTensor)>, MsgpackError> {
    let state = decode_state(origin, bytes)?;
    let has_batch_stats = state.top_keys.iter().any(|k| k == "batch_stats");
    let any_bf16 = state.leaves.iter().any(|(_, t)| t.dtype == PtDtype::BF16);
    let mut out = Vec::with_capacity(state.leaves.len());
    for (mut key, mut t) in state.leaves {
        let flat_name = key.join(".");
        let fail = |msg: String| format_err(origin, format!("`{flat_name}`: {msg}"));
        if any_bf16 && t.dtype == PtDtype::BF16 {
            t = bf16_to_f32(t);
        }
        let last = key.last().map(String::as_str).unwrap_or("");
        let rank = t.shape.len();
        let renamed: Option<&str> = if last == "kernel" && rank == 4 {
            t = permute(t, &[3, 2, 0, 1]).map_err(fail)?;
            Some("weight")
        } else if last == "kernel" {
            let reversed: Vec<usize> = (0..rank).rev().collect();
            t = permute(t, &reversed).map_err(fail)?;
            Some("weight")
        } else if last == "scale" || last == "embedding" {
            Some("weight")
        } else if last.contains("mean") {
            Some("running_mean")
        } else if last.contains("var") {
            Some("running_var")
        } else {
            None
        };
        if let (Some(new), Some(slot)) = (renamed, key.last_mut()) {
            *slot = new.to_string();
        }
        let name = if has_batch_stats {
            if key.len() < 2 {
                return Err(fail(
                    "expected every leaf under a collection (`params`/`batch_stats`) since the top level has \
                     `batch_stats`, found a top-level leaf"
                        .to_string(),
                ));
            }
            key.get(1..).unwrap_or(&[]).join(".")
        } else {
            key.join(".")
        };
        out.push((name, t));
    }
    check_unique(origin, &out)?;
    Ok(out)
}

fn read_file(path: &Path) -> Result<Vec<u8>, MsgpackError> {
    std::fs::read(path).map_err(|source| MsgpackError::Io {
        path: path.to_owned(),
        source,
    })
}

fn format_err(path: &Path, msg: impl Into<String>) -> MsgpackError {
    MsgpackError::Format {
        path: path.to_owned(),
        msg: msg.into(),
    }
}

fn check_unique(path: &Path, tensors: &Tensors) -> Result<(), MsgpackError> {
    let mut seen = HashSet::with_capacity(tensors.len());
    for (name, _) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(format_err(
                path,
                format!(
                    "expected unique tensor names, found `{name}` twice (a key containing '.'?)"
                ),
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// The state tree.

struct State {
    top_keys: Vec<String>,
    leaves: Vec<(Vec<String>, RawTensor)>,
}

/// A decoded msgpack value, as much of it as a Flax state needs: maps and arrays are kept, every other value
/// only as a description (it is an error wherever a tensor or a map is expected).
enum Node<'a> {
    Map(Vec<(String, Node<'a>)>),
    Array(ArrayRef<'a>),
    Other(Other),
}

struct Other {
    kind: Cow<'static, str>,
    int: Option<i128>,
    offset: usize,
}

struct ArrayRef<'a> {
    dtype: PtDtype,
    shape: Vec<usize>,
    data: &'a [u8],
}

fn decode_state(path: &Path, bytes: &[u8]) -> Result<State, MsgpackError> {
    let first =
        match bytes.first() {
            None => return Err(format_err(
                path,
                "file is empty (expected a Flax msgpack checkpoint: a msgpack map of parameters)",
            )),
            Some(&b) => b,
        };
    if !matches!(first, 0x80..=0x8f | 0xde | 0xdf) {
        let hint = if bytes.starts_with(b"PK") {
            " (a zip archive: a PyTorch checkpoint?)"
        } else if bytes.starts_with(&[0x80]) {
            " (a pickle?)"
        } else if bytes.len() >= 9 && bytes.get(8) == Some(&b'{') {
            " (a safetensors file?)"
        } else {
            ""
        };
        return Err(format_err(
            path,
            format!(
                "not a Flax msgpack checkpoint: expected a msgpack map (first byte 0x80-0x8f, 0xde or 0xdf), \
                 found byte 0x{first:02x}{hint}"
            ),
        ));
    }
    let mut dec = Decoder {
        path,
        buf: bytes,
        pos: 0,
        base: 0,
        entries: 0,
    };
    let root = dec.value(0)?;
    if dec.pos != bytes.len() {
        return Err(dec.err_at(
            dec.pos,
            format!(
                "expected the end of the file after the top-level map, found {} more bytes",
                bytes.len() - dec.pos
            ),
        ));
    }
    let entries = match root {
        Node::Map(entries) => entries,
        _ => {
            return Err(format_err(
                path,
                "expected a top-level msgpack map, found another value",
            ))
        }
    };
    if is_chunked(&entries) {
        return Err(format_err(
            path,
            "expected a map of parameters at the top level, found a single chunked array",
        ));
    }
    let top_keys = entries.iter().map(|(k, _)| k.clone()).collect();
    let mut leaves = Vec::new();
    let mut prefix = Vec::new();
    flatten(path, entries, &mut prefix, &mut leaves)?;
    if leaves.is_empty() {
        return Err(format_err(
            path,
            "expected at least one array in the parameter tree, found none",
        ));
    }
    Ok(State { top_keys, leaves })
}

const CHUNKED: &str = "__msgpack_chunked_array__";

fn is_chunked(entries: &[(String, Node<'_>)]) -> bool {
    entries.iter().any(|(k, _)| k == CHUNKED)
}

/// `flatten_dict` (empty maps vanish) with `_unchunk_array_leaves_in_place` folded in. Depth is bounded by the
/// decoder's own limit.
fn flatten(
    path: &Path,
    entries: Vec<(String, Node<'_>)>,
    prefix: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, RawTensor)>,
) -> Result<(), MsgpackError> {
    for (key, node) in entries {
        prefix.push(key);
        match node {
            Node::Array(a) => out.push((prefix.clone(), to_tensor(a))),
            Node::Map(sub) if is_chunked(&sub) => {
                let t = unchunk(path, &prefix.join("."), sub)?;
                out.push((prefix.clone(), t));
            }
            Node::Map(sub) => flatten(path, sub, prefix, out)?,
            Node::Other(o) => {
                return Err(format_err(
                    path,
                    format!(
                        "`{}` (byte {}): expected a map or an array (msgpack ext type 1), found {}",
                        prefix.join("."),
                        o.offset,
                        o.kind
                    ),
                ))
            }
        }
        prefix.pop();
    }
    Ok(())
}

fn to_tensor(a: ArrayRef<'_>) -> RawTensor {
    let mut data = a.data.to_vec();
    if a.dtype == PtDtype::Bool {
        for b in &mut data {
            *b = u8::from(*b != 0);
        }
    }
    RawTensor {
        dtype: a.dtype,
        shape: a.shape,
        data,
    }
}

/// flax's `_unchunk`: `shape` and `chunks` are maps keyed "0".."n-1"; the chunks are concatenated and reshaped.
fn unchunk(
    path: &Path,
    name: &str,
    entries: Vec<(String, Node<'_>)>,
) -> Result<RawTensor, MsgpackError> {
    let fail = |msg: String| format_err(path, format!("`{name}` (chunked array): {msg}"));
    let mut shape_map = None;
    let mut chunk_map = None;
    for (k, v) in entries {
        match (k.as_str(), v) {
            ("shape", Node::Map(m)) => shape_map = Some(m),
            ("chunks", Node::Map(m)) => chunk_map = Some(m),
            ("shape" | "chunks", _) => {
                return Err(fail(format!(
                    "expected `{k}` to be a map, found another value"
                )))
            }
            _ => {}
        }
    }
    let shape_map = shape_map.ok_or_else(|| fail("expected a `shape` map, found none".into()))?;
    let chunk_map = chunk_map.ok_or_else(|| fail("expected a `chunks` map, found none".into()))?;
    if shape_map.len() > MAX_NDIM {
        return Err(fail(format!(
            "expected at most {MAX_NDIM} dimensions, found {}",
            shape_map.len()
        )));
    }
    let shape_nodes = indexed(shape_map).map_err(|m| fail(format!("`shape`: {m}")))?;
    let mut shape = Vec::with_capacity(shape_nodes.len());
    for (i, node) in shape_nodes.into_iter().enumerate() {
        let d = match node {
            Node::Other(Other { int: Some(v), .. }) => usize::try_from(v).ok(),
            _ => None,
        };
        shape.push(d.ok_or_else(|| {
            fail(format!(
                "expected `shape[{i}]` to be a non-negative integer"
            ))
        })?);
    }
    let chunks = indexed(chunk_map).map_err(|m| fail(format!("`chunks`: {m}")))?;
    if chunks.is_empty() {
        return Err(fail("expected at least one chunk, found none".into()));
    }
    let mut dtype = None;
    let mut data = Vec::new();
    for (i, node) in chunks.into_iter().enumerate() {
        let a = match node {
            Node::Array(a) => a,
            _ => {
                return Err(fail(format!(
                    "expected chunk {i} to be an array, found another value"
                )))
            }
        };
        match dtype {
            None => dtype = Some(a.dtype),
            Some(d) if d != a.dtype => {
                return Err(fail(format!(
                    "expected every chunk in {}, found chunk {i} in {}",
                    dtype_name(d),
                    dtype_name(a.dtype)
                )))
            }
            Some(_) => {}
        }
        data.extend_from_slice(a.data); // bounded: these bytes are all in the input
    }
    let Some(dtype) = dtype else {
        return Err(fail("expected at least one chunk, found none".into()));
    };
    let want = nbytes(&shape, dtype).ok_or_else(|| fail(format!("shape {shape:?} overflows")))?;
    if want != data.len() {
        return Err(fail(format!(
            "shape {shape:?} in {} needs {want} bytes, the chunks hold {}",
            dtype_name(dtype),
            data.len()
        )));
    }
    let mut t = RawTensor { dtype, shape, data };
    if dtype == PtDtype::Bool {
        for b in &mut t.data {
            *b = u8::from(*b != 0);
        }
    }
    Ok(t)
}

/// `_dict_to_tuple`: the values of keys "0".."len-1", in that order (every one must be there).
fn indexed(entries: Vec<(String, Node<'_>)>) -> Result<Vec<Node<'_>>, String> {
    let n = entries.len();
    let mut slots: Vec<Option<Node<'_>>> = Vec::with_capacity(n);
    slots.resize_with(n, || None);
    for (k, v) in entries {
        let i = k
            .parse::<usize>()
            .ok()
            .filter(|i| *i < n && k == i.to_string())
            .ok_or_else(|| {
                format!(
                    "expected keys \"0\"..\"{}\", found {k:?}",
                    n.saturating_sub(1)
                )
            })?;
        match slots.get_mut(i) {
            Some(slot @ None) => *slot = Some(v),
            _ => {
                return Err(format!(
                    "expected keys \"0\"..\"{}\", found {k:?} twice",
                    n.saturating_sub(1)
                ))
            }
        }
    }
    slots
        .into_iter()
        .enumerate()
        .map(|(i, s)| s.ok_or_else(|| format!("expected key \"{i}\", found none")))
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// msgpack decoding.

struct Decoder<'a, 'p> {
    path: &'p Path,
    buf: &'a [u8],
    pos: usize,
    base: usize, // offset of `buf` in the file (ext payloads are decoded from a sub-slice)
    entries: usize, // map entries decoded so far (shared across ext payloads through `entries` hand-over)
}

impl<'a> Decoder<'a, '_> {
    fn err_at(&self, pos: usize, msg: String) -> MsgpackError {
        MsgpackError::Decode {
            path: self.path.to_owned(),
            offset: self.base.saturating_add(pos),
            msg,
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], MsgpackError> {
        let remaining = self.buf.len().saturating_sub(self.pos);
        if n > remaining {
            return Err(self.err_at(
                self.pos,
                format!("{what}: expected {n} bytes, found {remaining} (file truncated?)"),
            ));
        }
        let end = self.pos + n;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or_else(|| self.err_at(self.pos, format!("{what}: out of range")))?;
        self.pos = end;
        Ok(s)
    }

    fn be(&mut self, n: usize, what: &str) -> Result<u64, MsgpackError> {
        let s = self.take(n, what)?;
        Ok(s.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn len(&mut self, n: usize, what: &str) -> Result<usize, MsgpackError> {
        let at = self.pos;
        let v = self.be(n, what)?;
        usize::try_from(v)
            .map_err(|_| self.err_at(at, format!("{what}: length {v} does not fit in memory")))
    }

    /// Checks that `count` items of at least `min_bytes` each can still follow.
    fn check_count(&self, count: usize, min_bytes: usize, what: &str) -> Result<(), MsgpackError> {
        let remaining = self.buf.len().saturating_sub(self.pos);
        if count.saturating_mul(min_bytes) > remaining {
            return Err(self.err_at(
                self.pos,
                format!(
                    "{what} declares {count} elements, but only {remaining} bytes remain (expected at least \
                     {min_bytes} per element; file truncated or corrupted?)"
                ),
            ));
        }
        Ok(())
    }

    fn value(&mut self, depth: usize) -> Result<Node<'a>, MsgpackError> {
        let at = self.pos;
        if depth > MAX_DEPTH {
            return Err(self.err_at(
                at,
                format!("expected at most {MAX_DEPTH} levels of nesting, found more"),
            ));
        }
        let tag = self.be(1, "value tag")? as u8;
        let other = |kind: &'static str, int: Option<i128>| {
            Node::Other(Other {
                kind: Cow::Borrowed(kind),
                int,
                offset: at,
            })
        };
        Ok(match tag {
            0x00..=0x7f => other("an integer", Some(i128::from(tag))),
            0xe0..=0xff => other("an integer", Some(i128::from(tag as i8))),
            0x80..=0x8f => self.map(usize::from(tag & 0x0f), depth, at)?,
            0xde => {
                let n = self.len(2, "map16 length")?;
                self.map(n, depth, at)?
            }
            0xdf => {
                let n = self.len(4, "map32 length")?;
                self.map(n, depth, at)?
            }
            0x90..=0x9f => {
                self.skip_array(usize::from(tag & 0x0f), depth)?;
                other("a msgpack array (list)", None)
            }
            0xdc => {
                let n = self.len(2, "array16 length")?;
                self.skip_array(n, depth)?;
                other("a msgpack array (list)", None)
            }
            0xdd => {
                let n = self.len(4, "array32 length")?;
                self.skip_array(n, depth)?;
                other("a msgpack array (list)", None)
            }
            0xa0..=0xbf => {
                self.take(usize::from(tag & 0x1f), "str")?;
                other("a string", None)
            }
            0xd9..=0xdb => {
                let n = self.len(1 << (tag - 0xd9), "str length")?;
                self.take(n, "str")?;
                other("a string", None)
            }
            0xc4..=0xc6 => {
                let n = self.len(1 << (tag - 0xc4), "bin length")?;
                self.take(n, "bin")?;
                other("raw bytes (bin)", None)
            }
            0xc0 => other("nil", None),
            0xc2 | 0xc3 => other("a boolean", None),
            0xca => {
                self.take(4, "float32")?;
                other("a float", None)
            }
            0xcb => {
                self.take(8, "float64")?;
                other("a float", None)
            }
            0xcc..=0xcf => {
                let v = self.be(1 << (tag - 0xcc), "uint")?;
                other("an integer", Some(i128::from(v)))
            }
            0xd0..=0xd3 => {
                let n = 1usize << (tag - 0xd0);
                let v = self.be(n, "int")?;
                let shift = 64 - 8 * n as u32;
                let signed = ((v << shift) as i64) >> shift;
                other("an integer", Some(i128::from(signed)))
            }
            0xd4..=0xd8 => {
                let n = 1usize << (tag - 0xd4);
                self.ext(n, depth, at)?
            }
            0xc7..=0xc9 => {
                let n = self.len(1 << (tag - 0xc7), "ext length")?;
                self.ext(n, depth, at)?
            }
            0xc1 => {
                return Err(self.err_at(
                    at,
                    "expected a msgpack value, found the never-used byte 0xc1".into(),
                ))
            }
        })
    }

    fn map(&mut self, n: usize, depth: usize, at: usize) -> Result<Node<'a>, MsgpackError> {
        self.check_count(n, 2, "map")?;
        self.entries = self.entries.saturating_add(n);
        if self.entries > MAX_ENTRIES {
            return Err(self.err_at(
                at,
                format!("expected at most {MAX_ENTRIES} map entries in all, found more"),
            ));
        }
        // Grown as entries arrive, never reserved from the declared count: nested maps each declaring as many
        // entries as the rest of the file could hold would otherwise reserve that many times over.
        let mut entries = Vec::with_capacity(n.min(64));
        let mut seen: HashSet<&'a [u8]> = HashSet::with_capacity(n.min(64));
        for _ in 0..n {
            let key_at = self.pos;
            let key = self.key()?;
            if !seen.insert(key) {
                return Err(self.err_at(
                    key_at,
                    format!(
                        "expected unique map keys, found {:?} twice",
                        String::from_utf8_lossy(key)
                    ),
                ));
            }
            let key = std::str::from_utf8(key).map_err(|_| {
                self.err_at(
                    key_at,
                    "expected a UTF-8 string key, found invalid UTF-8".into(),
                )
            })?;
            let v = self.value(depth + 1)?;
            entries.push((key.to_string(), v));
        }
        Ok(Node::Map(entries))
    }

    fn key(&mut self) -> Result<&'a [u8], MsgpackError> {
        let at = self.pos;
        let tag = self.be(1, "map key")? as u8;
        let n = match tag {
            0xa0..=0xbf => usize::from(tag & 0x1f),
            0xd9..=0xdb => self.len(1 << (tag - 0xd9), "str length")?,
            _ => {
                return Err(self.err_at(
                    at,
                    format!("expected a string map key (parameter names are strings), found tag 0x{tag:02x}"),
                ))
            }
        };
        self.take(n, "str key")
    }

    /// Walks over `n` values without keeping them (lists are never part of a Flax parameter tree).
    fn skip_array(&mut self, n: usize, depth: usize) -> Result<(), MsgpackError> {
        self.check_count(n, 1, "array")?;
        for _ in 0..n {
            self.value(depth + 1)?;
        }
        Ok(())
    }

    fn ext(&mut self, n: usize, depth: usize, at: usize) -> Result<Node<'a>, MsgpackError> {
        let code = self.be(1, "ext type")? as u8 as i8;
        let payload_at = self.pos;
        let payload = self.take(n, "ext payload")?;
        match code {
            1 | 3 => {
                let mut sub = Decoder {
                    path: self.path,
                    buf: payload,
                    pos: 0,
                    base: self.base.saturating_add(payload_at),
                    entries: self.entries,
                };
                let a = sub.ndarray(depth + 1)?;
                self.entries = sub.entries;
                Ok(Node::Array(a))
            }
            2 => Ok(Node::Other(Other {
                kind: Cow::Borrowed("a complex number (msgpack ext type 2)"),
                int: None,
                offset: at,
            })),
            c => Ok(Node::Other(Other {
                kind: Cow::Owned(format!(
                    "msgpack ext type {c} (Flax writes arrays as type 1, numpy scalars as type 3)"
                )),
                int: None,
                offset: at,
            })),
        }
    }

    /// flax's `_ndarray_from_bytes`: `[shape, dtype name, data]` filling the whole payload.
    fn ndarray(&mut self, depth: usize) -> Result<ArrayRef<'a>, MsgpackError> {
        if depth > MAX_DEPTH {
            return Err(self.err_at(
                0,
                format!("expected at most {MAX_DEPTH} levels of nesting, found more"),
            ));
        }
        let tag = self.be(1, "array payload")? as u8;
        let count = match tag {
            0x90..=0x9f => usize::from(tag & 0x0f),
            0xdc => self.len(2, "array16 length")?,
            0xdd => self.len(4, "array32 length")?,
            _ => {
                return Err(self.err_at(
                    0,
                    format!("array payload: expected a msgpack array [shape, dtype, data], found tag 0x{tag:02x}"),
                ))
            }
        };
        if count != 3 {
            return Err(self.err_at(
                0,
                format!("array payload: expected 3 elements [shape, dtype, data], found {count}"),
            ));
        }
        // shape
        let shape_at = self.pos;
        let tag = self.be(1, "shape")? as u8;
        let ndim = match tag {
            0x90..=0x9f => usize::from(tag & 0x0f),
            0xdc => self.len(2, "shape length")?,
            0xdd => self.len(4, "shape length")?,
            _ => {
                return Err(self.err_at(
                    shape_at,
                    format!("shape: expected a list of integers, found tag 0x{tag:02x}"),
                ))
            }
        };
        if ndim > MAX_NDIM {
            return Err(self.err_at(
                shape_at,
                format!("shape: expected at most {MAX_NDIM} dimensions, found {ndim}"),
            ));
        }
        let mut shape = Vec::with_capacity(ndim);
        for i in 0..ndim {
            let dim_at = self.pos;
            let d = match self.value(depth + 1)? {
                Node::Other(Other { int: Some(v), .. }) => usize::try_from(v).ok(),
                _ => None,
            };
            let d = d.ok_or_else(|| {
                self.err_at(
                    dim_at,
                    format!("shape[{i}]: expected a non-negative integer, found another value"),
                )
            })?;
            shape.push(d);
        }
        // dtype name: str (use_bin_type) or bin (older writers); numpy reads either as bytes
        let dtype_at = self.pos;
        let name = self.bytes_value("dtype name")?;
        let dtype = dtype_from_name(name).ok_or_else(|| {
            self.err_at(
                dtype_at,
                format!(
                    "dtype: expected one of float32, float16, bfloat16, float64, int64, int32, int16, int8, uint8, \
                     bool, found {:?}",
                    String::from_utf8_lossy(name)
                ),
            )
        })?;
        let data_at = self.pos;
        let data = self.bytes_value("array data")?;
        let want = nbytes(&shape, dtype).ok_or_else(|| {
            self.err_at(
                shape_at,
                format!("shape {shape:?}: element count overflows"),
            )
        })?;
        if want != data.len() {
            return Err(self.err_at(
                data_at,
                format!(
                    "array data: expected {want} bytes for shape {shape:?} in {}, found {}",
                    dtype_name(dtype),
                    data.len()
                ),
            ));
        }
        if self.pos != self.buf.len() {
            return Err(self.err_at(
                self.pos,
                format!(
                    "array payload: expected its end, found {} more bytes",
                    self.buf.len() - self.pos
                ),
            ));
        }
        Ok(ArrayRef { dtype, shape, data })
    }

    /// A str or bin value's bytes.
    fn bytes_value(&mut self, what: &str) -> Result<&'a [u8], MsgpackError> {
        let at = self.pos;
        let tag = self.be(1, what)? as u8;
        let n = match tag {
            0xa0..=0xbf => usize::from(tag & 0x1f),
            0xd9..=0xdb => self.len(1 << (tag - 0xd9), what)?,
            0xc4..=0xc6 => self.len(1 << (tag - 0xc4), what)?,
            _ => {
                return Err(self.err_at(
                    at,
                    format!("{what}: expected a string or bytes, found tag 0x{tag:02x}"),
                ))
            }
        };
        self.take(n, what)
    }
}

fn dtype_from_name(name: &[u8]) -> Option<PtDtype> {
    Some(match name {
        b"float32" => PtDtype::F32,
        b"float16" => PtDtype::F16,
        b"bfloat16" => PtDtype::BF16,
        b"float64" => PtDtype::F64,
        b"int64" => PtDtype::I64,
        b"int32" => PtDtype::I32,
        b"int16" => PtDtype::I16,
        b"int8" => PtDtype::I8,
        b"uint8" => PtDtype::U8,
        b"bool" => PtDtype::Bool,
        _ => return None,
    })
}

fn dtype_name(d: PtDtype) -> &'static str {
    match d {
        PtDtype::F64 => "float64",
        PtDtype::F32 => "float32",
        PtDtype::F16 => "float16",
        PtDtype::BF16 => "bfloat16",
        PtDtype::I64 => "int64",
        PtDtype::I32 => "int32",
        PtDtype::I16 => "int16",
        PtDtype::I8 => "int8",
        PtDtype::U8 => "uint8",
        PtDtype::Bool => "bool",
    }
}

fn nbytes(shape: &[usize], dtype: PtDtype) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?
        .checked_mul(dtype.size_in_bytes())
}

// ---------------------------------------------------------------------------------------------------------------
// Layout changes.

fn bf16_to_f32(t: RawTensor) -> RawTensor {
    let mut data = Vec::with_capacity(t.data.len().saturating_mul(2));
    for pair in t.data.chunks_exact(2) {
        // bf16 is the high half of an f32: little-endian [lo, hi] -> [0, 0, lo, hi].
        data.extend_from_slice(&[0, 0]);
        data.extend_from_slice(pair);
    }
    RawTensor {
        dtype: PtDtype::F32,
        shape: t.shape,
        data,
    }
}

/// numpy's `transpose(perm)` made contiguous: output axis i is input axis perm[i].
fn permute(t: RawTensor, perm: &[usize]) -> Result<RawTensor, String> {
    let ndim = t.shape.len();
    if perm.len() != ndim {
        return Err(format!(
            "expected {} dimensions to transpose, found shape {:?}",
            perm.len(),
            t.shape
        ));
    }
    if perm.iter().enumerate().all(|(i, &p)| i == p) {
        return Ok(t);
    }
    let elem = t.dtype.size_in_bytes();
    // Row-major strides of the input, in elements.
    let mut strides = vec![1usize; ndim];
    for i in (0..ndim.saturating_sub(1)).rev() {
        let next = strides.get(i + 1).copied().unwrap_or(1);
        let dim = t.shape.get(i + 1).copied().unwrap_or(1);
        if let Some(s) = strides.get_mut(i) {
            *s = next.saturating_mul(dim);
        }
    }
    let mut new_shape = Vec::with_capacity(ndim);
    let mut new_strides = Vec::with_capacity(ndim);
    for &p in perm {
        match (t.shape.get(p), strides.get(p)) {
            (Some(&d), Some(&s)) => {
                new_shape.push(d);
                new_strides.push(s);
            }
            _ => return Err(format!("bad axis {p} for shape {:?}", t.shape)),
        }
    }
    let numel = t.data.len() / elem.max(1);
    let mut data = Vec::with_capacity(t.data.len());
    if numel > 0 {
        let mut idx = vec![0usize; ndim];
        let mut src = 0usize; // input element offset of `idx`
        for _ in 0..numel {
            let start = src.saturating_mul(elem);
            let bytes = t
                .data
                .get(start..start.saturating_add(elem))
                .ok_or_else(|| format!("transpose read out of range for shape {:?}", t.shape))?;
            data.extend_from_slice(bytes);
            // Advance the output index (row-major), keeping `src` in step.
            for axis in (0..ndim).rev() {
                let (Some(i), Some(&d), Some(&s)) = (
                    idx.get_mut(axis),
                    new_shape.get(axis),
                    new_strides.get(axis),
                ) else {
                    break;
                };
                *i += 1;
                src = src.saturating_add(s);
                if *i < d {
                    break;
                }
                src = src.saturating_sub(s.saturating_mul(d));
                *i = 0;
            }
        }
    }
    Ok(RawTensor {
        dtype: t.dtype,
        shape: new_shape,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/flax");
    const CASES: [&str; 5] = [
        "model_relpos",
        "mim_shared",
        "cls_abspos_noscale",
        "cls_abspos_scale",
        "dtypes",
    ];

    fn values_f64(t: &RawTensor) -> Vec<f64> {
        let n = t.dtype.size_in_bytes();
        t.data
            .chunks_exact(n)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..n].copy_from_slice(c);
                match t.dtype {
                    PtDtype::F64 => f64::from_le_bytes(b),
                    PtDtype::F32 => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                    PtDtype::F16 => f16_to_f64(u16::from_le_bytes([b[0], b[1]])),
                    PtDtype::BF16 => f64::from(f32::from_bits(
                        u32::from(u16::from_le_bytes([b[0], b[1]])) << 16,
                    )),
                    PtDtype::I64 => i64::from_le_bytes(b) as f64,
                    PtDtype::I32 => f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                    PtDtype::I16 => f64::from(i16::from_le_bytes([b[0], b[1]])),
                    PtDtype::I8 => f64::from(b[0] as i8),
                    PtDtype::U8 | PtDtype::Bool => f64::from(b[0]),
                }
            })
            .collect()
    }

    fn f16_to_f64(h: u16) -> f64 {
        let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        let exp = i32::from((h >> 10) & 0x1f);
        let frac = f64::from(h & 0x3ff);
        sign * match exp {
            0 => frac * 2f64.powi(-24),
            31 => f64::INFINITY,
            e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
        }
    }

    fn dtype_str(d: PtDtype) -> &'static str {
        dtype_name(d)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-3 * b.abs().max(1e-3)
    }

    /// Checks tensors against a fixture JSON's `tensors` entries: same names (as a set), shapes, dtypes, sums.
    fn check_against(case: &str, file: &str, got: &Tensors, same_order: bool) {
        let text = std::fs::read_to_string(format!("{FIXTURES}/{case}/{file}")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let want = json["tensors"].as_array().unwrap();
        let got_map: HashMap<&str, &RawTensor> = got.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let want_names: Vec<&str> = want.iter().map(|e| e["name"].as_str().unwrap()).collect();
        let missing: Vec<_> = want_names
            .iter()
            .filter(|n| !got_map.contains_key(*n))
            .collect();
        let extra: Vec<_> = got
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !want_names.contains(n))
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{case}/{file}: missing {missing:?}, extra {extra:?}"
        );
        assert_eq!(got.len(), want.len(), "{case}/{file}: duplicate names");
        if same_order {
            let got_names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(got_names, want_names, "{case}/{file}: order");
        }
        for e in want {
            let name = e["name"].as_str().unwrap();
            let t = got_map[name];
            let shape: Vec<usize> = e["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(t.shape, shape, "{case}/{file}: `{name}` shape");
            assert_eq!(
                dtype_str(t.dtype),
                e["dtype"].as_str().unwrap(),
                "{case}/{file}: `{name}` dtype"
            );
            let numel: usize = shape.iter().product();
            assert_eq!(
                t.data.len(),
                numel * t.dtype.size_in_bytes(),
                "{case}/{file}: `{name}` bytes"
            );
            let v = values_f64(t);
            let sum: f64 = v.iter().sum();
            let wsum: f64 = v
                .iter()
                .enumerate()
                .map(|(i, x)| x * ((i % 7) + 1) as f64)
                .sum();
            let (want_sum, want_wsum) = (e["sum"].as_f64().unwrap(), e["wsum"].as_f64().unwrap());
            assert!(
                close(sum, want_sum),
                "{case}/{file}: `{name}` sum {sum} != {want_sum}"
            );
            assert!(
                close(wsum, want_wsum),
                "{case}/{file}: `{name}` weighted sum {wsum} != {want_wsum} (layout)"
            );
        }
    }

    #[test]
    fn pytorch_names_shapes_and_sums_match_transformers() {
        for case in CASES {
            let path = PathBuf::from(format!("{FIXTURES}/{case}/flax_model.msgpack"));
            let got = read_flax_as_pytorch(&path).unwrap_or_else(|e| panic!("{e}"));
            check_against(case, "pt_expected.json", &got, case == "dtypes");
            // Every name transformers loads from the Flax file, and no other; state-dict entries it leaves
            // alone (none for BEiT: relative_position_index is not in PyTorch BEiT's state dict) are absent.
            let text =
                std::fs::read_to_string(format!("{FIXTURES}/{case}/pt_expected.json")).unwrap();
            let json: serde_json::Value = serde_json::from_str(&text).unwrap();
            let loaded: HashSet<&str> = json["loaded_from_flax"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            let ours: HashSet<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(ours, loaded, "{case}");
            assert!(json["not_loaded"].as_array().unwrap().is_empty(), "{case}");
        }
    }

    #[test]
    fn raw_flax_leaves_match_flax() {
        for case in CASES {
            let path = PathBuf::from(format!("{FIXTURES}/{case}/flax_model.msgpack"));
            let got = read_flax_msgpack(&path).unwrap_or_else(|e| panic!("{e}"));
            check_against(case, "flax_raw.json", &got, true);
        }
    }

    #[test]
    fn known_names_and_layouts() {
        let path = PathBuf::from(format!("{FIXTURES}/cls_abspos_scale/flax_model.msgpack"));
        let raw = read_flax_msgpack(&path).unwrap();
        let pt = read_flax_as_pytorch(&path).unwrap();
        let raw: HashMap<_, _> = raw.into_iter().collect();
        let pt: HashMap<_, _> = pt.into_iter().collect();
        for name in [
            "beit.embeddings.cls_token",
            "beit.embeddings.position_embeddings",
            "beit.encoder.layer.1.lambda_2",
            "beit.pooler.layernorm.weight",
            "classifier.weight",
            "classifier.bias",
        ] {
            assert!(pt.contains_key(name), "{name}");
        }
        // Dense: (in, out) -> (out, in), element [o][i] == kernel[i][o].
        let k = &raw["beit.encoder.layer.0.attention.attention.query.kernel"];
        let w = &pt["beit.encoder.layer.0.attention.attention.query.weight"];
        let (kv, wv) = (values_f64(k), values_f64(w));
        assert_eq!(k.shape, vec![32, 32]);
        for i in 0..32 {
            for o in 0..32 {
                assert_eq!(wv[o * 32 + i], kv[i * 32 + o]);
            }
        }
        // Conv: (kh, kw, in, out) -> (out, in, kh, kw).
        let k = &raw["beit.embeddings.patch_embeddings.projection.kernel"];
        let w = &pt["beit.embeddings.patch_embeddings.projection.weight"];
        assert_eq!(k.shape, vec![8, 8, 3, 32]);
        assert_eq!(w.shape, vec![32, 3, 8, 8]);
        let (kv, wv) = (values_f64(k), values_f64(w));
        for (o, c, y, x) in [(0, 0, 0, 0), (31, 2, 7, 7), (5, 1, 3, 6), (17, 0, 6, 2)] {
            assert_eq!(
                wv[((o * 3 + c) * 8 + y) * 8 + x],
                kv[((y * 8 + x) * 3 + c) * 32 + o]
            );
        }
        assert_eq!(
            pt["beit.pooler.layernorm.weight"],
            raw["beit.pooler.layernorm.scale"]
        );
    }

    // ----- hostile input -----

    fn enc_uint(out: &mut Vec<u8>, v: u64) {
        if v < 128 {
            out.push(v as u8);
        } else {
            out.push(0xcf);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
    fn enc_str(out: &mut Vec<u8>, s: &str) {
        assert!(s.len() < 256);
        out.push(0xd9);
        out.push(s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }
    fn enc_bin(out: &mut Vec<u8>, b: &[u8]) {
        out.push(0xc6);
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    }
    fn enc_map_header(out: &mut Vec<u8>, n: u32) {
        out.push(0xdf);
        out.extend_from_slice(&n.to_be_bytes());
    }
    fn enc_ext(out: &mut Vec<u8>, code: i8, payload: &[u8]) {
        out.push(0xc9);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.push(code as u8);
        out.extend_from_slice(payload);
    }
    fn payload(shape: &[u64], dtype: &str, data: &[u8]) -> Vec<u8> {
        let mut p = vec![0x93, 0xdd];
        p.extend_from_slice(&(shape.len() as u32).to_be_bytes());
        for &d in shape {
            enc_uint(&mut p, d);
        }
        enc_str(&mut p, dtype);
        enc_bin(&mut p, data);
        p
    }
    /// {"w": {"kernel": <ext code, payload>}}
    fn one_array(code: i8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        enc_map_header(&mut f, 1);
        enc_str(&mut f, "w");
        enc_map_header(&mut f, 1);
        enc_str(&mut f, "kernel");
        enc_ext(&mut f, code, payload);
        f
    }

    fn decode_both(bytes: &[u8]) -> Result<Tensors, MsgpackError> {
        let origin = Path::new("<test>");
        let raw = decode_flax_msgpack(origin, bytes);
        let pt = decode_flax_as_pytorch(origin, bytes);
        // Renaming can only add errors (two leaves mapping to one name), never remove one.
        assert!(raw.is_ok() || pt.is_err());
        pt
    }

    fn expect_err(bytes: &[u8], needle: &str) {
        match decode_both(bytes) {
            Ok(t) => panic!(
                "expected an error containing {needle:?}, got {} tensors",
                t.len()
            ),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.starts_with("<test>: "), "{msg}");
                assert!(msg.contains(needle), "expected {needle:?} in: {msg}");
            }
        }
    }

    #[test]
    fn crafted_good_file() {
        let data: Vec<u8> = (0..24u8).flat_map(|i| f32::from(i).to_le_bytes()).collect();
        let f = one_array(1, &payload(&[2, 3, 4], "float32", &data));
        let pt = decode_both(&f).unwrap();
        assert_eq!(pt.len(), 1);
        assert_eq!(pt[0].0, "w.weight");
        assert_eq!(pt[0].1.shape, vec![4, 3, 2]); // rank 3: `.T` reverses every axis
        let v = values_f64(&pt[0].1);
        assert_eq!(v[1], 12.0); // [0][0][1] <- [1][0][0]
    }

    #[test]
    fn errors_not_panics() {
        let f32s = |n: usize| vec![0u8; 4 * n];
        expect_err(&[], "file is empty");
        expect_err(b"PK\x03\x04rest", "zip archive");
        expect_err(&[0x07], "expected a msgpack map");
        expect_err(&[0x80], "expected at least one array");
        expect_err(&[0x81], "file truncated");
        expect_err(&[0x80, 0x00], "expected the end of the file");
        // wrong ext types and payloads
        expect_err(
            &one_array(5, &payload(&[2], "float32", &f32s(2))),
            "msgpack ext type 5",
        );
        expect_err(&one_array(2, &[0x92, 0x00, 0x00]), "complex number");
        expect_err(
            &one_array(1, &payload(&[2], "complex64", &f32s(4))),
            "found \"complex64\"",
        );
        expect_err(
            &one_array(1, &payload(&[3], "float32", &f32s(2))),
            "expected 12 bytes",
        );
        expect_err(&one_array(1, &[0x92, 0x90, 0xa0]), "expected 3 elements");
        expect_err(&one_array(1, &[0x01]), "expected a msgpack array");
        let mut trailing = payload(&[1], "float32", &f32s(1));
        trailing.push(0xc0);
        expect_err(&one_array(1, &trailing), "1 more bytes");
        // huge declared sizes: shapes that overflow, lengths past the end
        expect_err(
            &one_array(1, &payload(&[1 << 40, 1 << 40, 1 << 40], "float32", &[])),
            "overflows",
        );
        expect_err(
            &one_array(1, &payload(&[u64::MAX], "uint8", &[])),
            "expected",
        );
        expect_err(
            &one_array(1, &payload(&[1; 65], "float32", &f32s(1))),
            "at most 64 dimensions",
        );
        for huge in [
            vec![0xdf, 0xff, 0xff, 0xff, 0xff],                   // map32
            vec![0x81, 0xa1, b'a', 0xdd, 0xff, 0xff, 0xff, 0xff], // array32
            vec![0x81, 0xa1, b'a', 0xc6, 0xff, 0xff, 0xff, 0xff], // bin32
            vec![0x81, 0xa1, b'a', 0xdb, 0xff, 0xff, 0xff, 0xff], // str32
            vec![0x81, 0xa1, b'a', 0xc9, 0xff, 0xff, 0xff, 0xff, 0x01], // ext32
            vec![0x81, 0xdb, 0xff, 0xff, 0xff, 0xff],             // str32 key
        ] {
            expect_err(&huge, "");
        }
        let mut big_bin = one_array(1, &payload(&[4], "float32", &f32s(4)));
        let at = big_bin.len() - 16 - 4;
        big_bin[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        expect_err(&big_bin, "");
        // structure
        expect_err(&[0x81, 0x01, 0x01], "expected a string map key");
        expect_err(&[0x81, 0xa1, b'a', 0x01], "found an integer");
        expect_err(&[0x81, 0xa1, b'a', 0x91, 0xc0], "msgpack array");
        expect_err(&[0x82, 0xa1, b'a', 0x80, 0xa1, b'a', 0x80], "twice");
        expect_err(&[0x81, 0xa2, 0xff, 0xfe, 0x80], "UTF-8");
        expect_err(&[0x81, 0xa1, b'a', 0xc1], "0xc1");
        // deep nesting, of maps and of lists, far past the limit: an error, not a stack overflow
        let mut deep = Vec::new();
        for _ in 0..100_000 {
            deep.extend_from_slice(&[0x81, 0xa1, b'a']);
        }
        deep.push(0x80);
        expect_err(&deep, "levels of nesting");
        let mut deep = vec![0x81, 0xa1, b'a'];
        deep.extend(vec![0x91u8; 100_000]);
        deep.push(0xc0);
        expect_err(&deep, "levels of nesting");
    }

    #[test]
    fn chunked_arrays() {
        // {"x": {"__msgpack_chunked_array__": true, "shape": {"0": 2, "1": 3}, "chunks": {"0": [4], "1": [2]}}}
        let build = |shape: &[(&str, u64)], chunks: &[(&str, &str, usize)]| {
            let mut f = vec![0x81];
            enc_str(&mut f, "x");
            f.push(0x83);
            enc_str(&mut f, CHUNKED);
            f.push(0xc3);
            enc_str(&mut f, "shape");
            f.push(0x80 | shape.len() as u8);
            for (k, v) in shape {
                enc_str(&mut f, k);
                enc_uint(&mut f, *v);
            }
            enc_str(&mut f, "chunks");
            f.push(0x80 | chunks.len() as u8);
            let mut next = 0f32;
            for (k, dtype, n) in chunks {
                enc_str(&mut f, k);
                let data: Vec<u8> = (0..*n)
                    .flat_map(|_| {
                        next += 1.0;
                        next.to_le_bytes()
                    })
                    .collect();
                enc_ext(&mut f, 1, &payload(&[*n as u64], dtype, &data));
            }
            f
        };
        let ok = build(
            &[("0", 2), ("1", 3)],
            &[("0", "float32", 4), ("1", "float32", 2)],
        );
        let t = decode_both(&ok).unwrap();
        assert_eq!(t[0].0, "x");
        assert_eq!(t[0].1.shape, vec![2, 3]);
        assert_eq!(values_f64(&t[0].1), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        expect_err(
            &build(&[("0", 2), ("1", 3)], &[("0", "float32", 4)]),
            "needs 24 bytes",
        );
        expect_err(
            &build(
                &[("0", 2), ("1", 3)],
                &[("0", "float32", 4), ("2", "float32", 2)],
            ),
            "found \"2\"",
        );
        expect_err(
            &build(
                &[("0", 2), ("1", 3)],
                &[("0", "float32", 4), ("1", "int32", 2)],
            ),
            "chunk 1 in int32",
        );
        expect_err(
            &build(&[("0", 2), ("x", 3)], &[("0", "float32", 6)]),
            "found \"x\"",
        );
        expect_err(&build(&[("0", 6)], &[]), "at least one chunk");
    }

    #[test]
    fn truncations_and_bit_flips_never_panic() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for case in ["dtypes", "mim_shared"] {
            let bytes = std::fs::read(format!("{FIXTURES}/{case}/flax_model.msgpack")).unwrap();
            let step = (bytes.len() / 3000).max(1);
            for len in (0..bytes.len()).step_by(step) {
                assert!(
                    decode_both(&bytes[..len]).is_err(),
                    "{case}: truncated at {len} decoded"
                );
            }
            // Flip bytes: every position of the small file, a pseudo-random sample of the large one.
            let positions: Vec<usize> = if bytes.len() < 5000 {
                (0..bytes.len()).collect()
            } else {
                (0..1000)
                    .map(|_| {
                        // xorshift64
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        (seed % bytes.len() as u64) as usize
                    })
                    .collect()
            };
            for pos in positions {
                for x in [0x01u8, 0x80, 0xff, 0x10] {
                    let mut b = bytes.clone();
                    b[pos] ^= x;
                    let _ = decode_both(&b);
                }
            }
        }
    }
}
