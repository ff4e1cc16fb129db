//! Safe reader for PyTorch `torch.save` checkpoints (the zip format of torch >= 1.6).
//!
//! `torch.load` can run arbitrary code: `data.pkl` may call any importable function.
//! This reader never executes anything. It interprets the pickle opcodes itself into an
//! inert object graph and refuses every GLOBAL outside a small allow-list, so a hostile
//! file can at worst produce an error. The input is untrusted (and fuzzed): there is no
//! panicking code path, allocations are capped by what the file really holds, and the
//! object-graph walk is bounded in depth and work.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use zip::{CompressionMethod, ZipArchive};

/// Element type of a tensor, as named by its torch storage class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PtDtype {
    /// float64
    F64,
    /// float32
    F32,
    /// float16
    F16,
    /// bfloat16
    BF16,
    /// int64
    I64,
    /// int32
    I32,
    /// int16
    I16,
    /// int8
    I8,
    /// uint8
    U8,
    /// bool
    Bool,
}

impl PtDtype {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            PtDtype::F64 | PtDtype::I64 => 8,
            PtDtype::F32 | PtDtype::I32 => 4,
            PtDtype::F16 | PtDtype::BF16 | PtDtype::I16 => 2,
            PtDtype::I8 | PtDtype::U8 | PtDtype::Bool => 1,
        }
    }
}

/// One tensor: little-endian, contiguous row-major bytes, already gathered from its
/// storage using the storage offset and strides.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Element type.
    pub dtype: PtDtype,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Little-endian, contiguous bytes.
    pub data: Vec<u8>,
}

/// Every error names the file and says what was expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    /// The file could not be read.
    #[error("{}: cannot read file: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not a zip archive as torch.save writes.
    #[error("{}: not a readable torch.save zip archive (truncated or corrupted?): {source}", .path.display())]
    Zip {
        /// The file.
        path: PathBuf,
        /// The zip reader's error.
        source: zip::result::ZipError,
    },
    /// The pre-1.6 torch.save format.
    #[error("{}: legacy (pre-1.6) torch.save format is not supported; re-save with torch>=1.6", .path.display())]
    Legacy {
        /// The file.
        path: PathBuf,
    },
    /// The pickle names a global we do not execute.
    #[error("{}: refused pickle global `{global}` (only torch tensor rebuild functions, storages and OrderedDict are allowed, plus torch.nn module classes and module classes named by the caller)", .path.display())]
    RefusedGlobal {
        /// The file.
        path: PathBuf,
        /// The refused `module.name`.
        global: String,
    },
    /// The pickle program is malformed.
    #[error("{}: data.pkl at byte {offset}: {msg}", .path.display())]
    Pickle {
        /// The file.
        path: PathBuf,
        /// Byte offset of the failure.
        offset: usize,
        /// What was wrong.
        msg: String,
    },
    /// The data is not a checkpoint of the expected shape.
    #[error("{}: {msg}", .path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
    /// The file holds no tensor.
    #[error("{}: no tensors found (expected a state dict or an nn.Module holding at least one tensor)", .path.display())]
    NoTensors {
        /// The file.
        path: PathBuf,
    },
}

type R<T> = Result<T, PickleError>;
type Tensors = Vec<(String, RawTensor)>;

/// Reads every tensor of a torch.save zip checkpoint (a state dict, possibly nested in dicts like {"model": {...}} or {"state_dict": ...}; keys joined with '.'), or a whole pickled nn.Module: walk objects built by allowed module classes (their __dict__ state set by BUILD; tensors found in `_parameters` and `_buffers` OrderedDicts, submodules in `_modules`), naming tensors like a state_dict would ("blocks.group_1.block_1.res_path.conv_1.w").
pub fn read_torch_checkpoint(path: &Path) -> Result<Vec<(String, RawTensor)>, PickleError> {
    read_torch_checkpoint_with(path, &[])
}

/// Same, with the caller adding module classes (e.g. "dall_e.encoder.Encoder") to the allow-list.
/// An entry ending in '*' allows every class whose dotted name starts with the rest ("dall_e.*").
pub fn read_torch_checkpoint_with(
    path: &Path,
    allowed_module_classes: &[&str],
) -> Result<Vec<(String, RawTensor)>, PickleError> {
    let io = |source| PickleError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut magic = Vec::with_capacity(4);
    (&mut file).take(4).read_to_end(&mut magic).map_err(io)?;
    file.rewind().map_err(io)?;
    read_archive(path, BufReader::new(file), &magic, file_len, allowed_module_classes)
}

/// [`read_torch_checkpoint_with`] on the bytes of a checkpoint already in memory; `origin` only names them
/// in errors.
pub fn read_torch_checkpoint_bytes(
    origin: &Path,
    bytes: &[u8],
    allowed_module_classes: &[&str],
) -> Result<Vec<(String, RawTensor)>, PickleError> {
    let magic = &bytes[..bytes.len().min(4)];
    read_archive(origin, std::io::Cursor::new(bytes), magic, bytes.len() as u64, allowed_module_classes)
}

/// The shared body of the readers: `magic` is the file's first (up to) 4 bytes, `reader` is at its start.
fn read_archive<F: Read + Seek>(
    path: &Path,
    reader: F,
    magic: &[u8],
    file_len: u64,
    allowed_module_classes: &[&str],
) -> Result<Vec<(String, RawTensor)>, PickleError> {
    // Sniff the format first so the common mistakes get a precise message.
    if magic.is_empty() {
        return Err(bad(
            path,
            "file is empty (expected a torch.save zip archive)",
        ));
    }
    if magic.first() == Some(&0x80) {
        // A bare pickle (PROTO opcode first) is the legacy format.
        return Err(PickleError::Legacy {
            path: path.to_owned(),
        });
    }
    if !magic.starts_with(b"PK") {
        let msg = format!("not a zip archive: expected bytes `PK..`, found {magic:02x?}");
        return Err(bad(path, msg));
    }
    let zip = |source| PickleError::Zip {
        path: path.to_owned(),
        source,
    };
    let archive = ZipArchive::new(reader).map_err(zip)?;
    // Entries live under one top directory named after the file ("archive/", "pytorch_model/").
    let prefix = archive
        .file_names()
        .filter_map(|n| n.strip_suffix("data.pkl"))
        .find(|p| p.ends_with('/') && p.matches('/').count() == 1)
        .map(str::to_owned)
        .ok_or_else(|| {
            bad(
                path,
                "no `<dir>/data.pkl` entry (expected a torch.save checkpoint)",
            )
        })?;
    let mut zip = Zip {
        path,
        archive,
        prefix,
        file_len,
    };
    if let Ok(order) = zip.read("byteorder", None) {
        let order = String::from_utf8_lossy(&order);
        if order.trim() != "little" {
            let msg = format!("byteorder is `{}`, expected `little`", order.trim());
            return Err(bad(path, msg));
        }
    }
    let pkl = zip.read("data.pkl", None)?;
    load_pickle(&mut zip, &pkl, allowed_module_classes)
}

// Caps: far above what real checkpoints use; they keep hostile files bounded.
const MAX_PKL_BYTES: u64 = 256 << 20;
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 22;
const MAX_ITEMS: usize = 1 << 22; // heap objects + container elements
const MAX_DEPTH: usize = 256; // object-graph nesting when collecting tensors
const MAX_NDIM: usize = 64;
const MAX_EXPANDED_BYTES: usize = 64 << 20; // tensors larger than their storage (stride 0)

fn bad(path: &Path, msg: impl Into<String>) -> PickleError {
    PickleError::Format {
        path: path.to_owned(),
        msg: msg.into(),
    }
}

struct Zip<'p, F> {
    path: &'p Path,
    archive: ZipArchive<F>,
    prefix: String, // "<dir>/"
    file_len: u64,
}

impl<F: Read + Seek> Zip<'_, F> {
    /// Reads entry `<dir>/<name>`: exactly `want` bytes of it when given, else all of it.
    fn read(&mut self, name: &str, want: Option<u64>) -> R<Vec<u8>> {
        let (path, name) = (self.path, format!("{}{name}", self.prefix));
        let err = |msg: String| Err(bad(path, format!("zip entry `{name}`: {msg}")));
        let mut f = match self.archive.by_name(&name) {
            Ok(f) => f,
            Err(e) => return err(e.to_string()),
        };
        let size = f.size();
        let want = match want {
            Some(w) if w > size => return err(format!("holds {size} bytes, expected {w}")),
            None if size > MAX_PKL_BYTES => return err(format!("{size} bytes, expected less")),
            w => w.unwrap_or(size),
        };
        // Deflate expands at most ~1032x: refuse zip bombs before inflating them.
        let zsize = f.compressed_size();
        if f.compression() != CompressionMethod::Stored
            && want > zsize.saturating_mul(1032).saturating_add(4096)
        {
            return err(format!("claims {want} bytes from {zsize} compressed bytes"));
        }
        // Never trust a size field for the allocation: the file bounds it.
        let mut buf = Vec::with_capacity(usize::try_from(want.min(self.file_len)).unwrap_or(0));
        // One byte past `want`, so an entry read to its end gets its CRC checked by `zip`.
        if let Err(e) = (&mut f).take(want.saturating_add(1)).read_to_end(&mut buf) {
            return err(e.to_string());
        }
        if (buf.len() as u64) < want {
            return err(format!(
                "truncated: expected {want} bytes, found {}",
                buf.len()
            ));
        }
        buf.truncate(usize::try_from(want).unwrap_or(usize::MAX));
        Ok(buf)
    }
}

/// Interprets `pkl`, collects the tensors reachable from its result and gathers their
/// data from the archive's storage entries.
fn load_pickle<F: Read + Seek>(zip: &mut Zip<F>, pkl: &[u8], allowed: &[&str]) -> R<Tensors> {
    let path = zip.path;
    let mut m = Machine {
        path,
        allowed,
        data: pkl,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        heap: Vec::new(),
        items: 0,
    };
    let root = m.run()?;
    let budget = m.heap.len().saturating_mul(4).saturating_add(1024);
    let mut w = Walker {
        heap: &m.heap,
        budget,
        out: Vec::new(),
    };
    w.walk(&root, "", 0).map_err(|msg| bad(path, msg))?;
    let tensors: Vec<(String, &TensorMeta)> = (w.out.into_iter())
        .filter_map(|(name, i)| match m.heap.get(i) {
            Some(Obj::Tensor(t)) => Some((name, t)),
            _ => None,
        })
        .collect();
    if tensors.is_empty() {
        return Err(PickleError::NoTensors {
            path: path.to_owned(),
        });
    }
    // Load each storage once; keep it only while later tensors still need it.
    let mut uses: HashMap<&StorageRef, usize> = HashMap::new();
    for (_, t) in &tensors {
        *uses.entry(&t.storage).or_insert(0) += 1;
    }
    let mut cache: HashMap<&StorageRef, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let s = &t.storage;
        let es = s.dtype.size_in_bytes();
        let bytes = match cache.remove(s) {
            Some(b) => b,
            None => zip.read(
                &format!("data/{}", s.key),
                Some((s.numel as u64).saturating_mul(es as u64)),
            )?,
        };
        let Some(data) = gather(&bytes, es, t) else {
            return Err(bad(
                path,
                format!("tensor `{name}` lies outside its storage `{}`", s.key),
            ));
        };
        out.push((
            name,
            RawTensor {
                dtype: s.dtype,
                shape: t.shape.clone(),
                data,
            },
        ));
        if let Some(n) = uses.get_mut(s) {
            *n = n.saturating_sub(1);
            if *n > 0 {
                cache.insert(s, bytes);
            }
        }
    }
    Ok(out)
}

/// Copies the elements of a strided view into a contiguous row-major buffer.
/// Bounds were checked when the tensor was rebuilt; every access is checked again.
fn gather(src: &[u8], es: usize, t: &TensorMeta) -> Option<Vec<u8>> {
    let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let mut out = Vec::with_capacity(numel.checked_mul(es)?);
    if numel == 0 {
        return Some(out);
    }
    // A unit-stride innermost dimension is copied as one run.
    let (row, outer) = match (t.shape.last(), t.stride.last()) {
        (Some(&n), Some(&1)) => (n, t.shape.len().saturating_sub(1)),
        _ => (1, t.shape.len()),
    };
    let row_bytes = row.checked_mul(es)?;
    let mut idx = vec![0usize; outer];
    let mut cur = t.offset;
    loop {
        let start = cur.checked_mul(es)?;
        out.extend_from_slice(src.get(start..start.checked_add(row_bytes)?)?);
        // Odometer over the outer dimensions, last one fastest; done when all wrap.
        let mut d = outer;
        loop {
            d = match d.checked_sub(1) {
                Some(d) => d,
                None => return Some(out),
            };
            let (n, s, i) = (*t.shape.get(d)?, *t.stride.get(d)?, idx.get_mut(d)?);
            *i += 1;
            cur = cur.checked_add(s)?;
            if *i < n {
                break;
            }
            *i = 0;
            cur = cur.checked_sub(s.checked_mul(n)?)?;
        }
    }
}

#[derive(Debug, Clone)]
#[allow(dead_code)] // payloads are read through Debug, in error messages
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Global(Global),
    Ref(usize), // index into Machine::heap
    Opaque,     // bytes, torch.device: never needed
}

/// The allowed globals. None is ever called: each has an inert meaning here.
#[derive(Debug, Clone)]
#[allow(dead_code)] // payloads are read through Debug, in error messages
enum Global {
    RebuildTensor,
    RebuildParameter, // _rebuild_parameter(_with_state): the data is argument 0 in both
    OrderedDict,
    Set,
    Size,
    Device,
    Storage(PtDtype),
    Dtype(PtDtype),
    Class(Rc<str>),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct StorageRef {
    key: Rc<str>,
    dtype: PtDtype,
    numel: usize,
}

#[derive(Debug)]
struct TensorMeta {
    storage: StorageRef,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// Heap objects: mutable containers are shared between the stack and the memo.
#[derive(Debug)]
enum Obj {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Set(Vec<Value>),
    Storage(StorageRef),
    Tensor(TensorMeta),
    Instance {
        class: Rc<str>,
        state: Option<Value>,
    },
}

fn resolve_global(module: &str, name: &str, allowed: &[&str]) -> Option<Global> {
    use PtDtype::*;
    let (storage, dtype) = match name {
        "DoubleStorage" => (Some(F64), None),
        "FloatStorage" => (Some(F32), None),
        "HalfStorage" => (Some(F16), None),
        "BFloat16Storage" => (Some(BF16), None),
        "LongStorage" => (Some(I64), None),
        "IntStorage" => (Some(I32), None),
        "ShortStorage" => (Some(I16), None),
        "CharStorage" => (Some(I8), None),
        "ByteStorage" | "UntypedStorage" => (Some(U8), None),
        "BoolStorage" => (Some(Bool), None),
        "float64" | "double" => (None, Some(F64)),
        "float32" | "float" => (None, Some(F32)),
        "float16" | "half" => (None, Some(F16)),
        "bfloat16" => (None, Some(BF16)),
        "int64" | "long" => (None, Some(I64)),
        "int32" | "int" => (None, Some(I32)),
        "int16" | "short" => (None, Some(I16)),
        "int8" => (None, Some(I8)),
        "uint8" => (None, Some(U8)),
        "bool" => (None, Some(Bool)),
        _ => (None, None),
    };
    let g = match (module, name, storage, dtype) {
        ("torch._utils", "_rebuild_tensor_v2", ..) => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state", ..) => {
            Global::RebuildParameter
        }
        ("collections", "OrderedDict", ..) => Global::OrderedDict,
        ("builtins" | "__builtin__", "set" | "frozenset", ..) => Global::Set,
        ("torch", "Size", ..) => Global::Size,
        ("torch", "device", ..) => Global::Device,
        ("torch.storage", "UntypedStorage", ..) => Global::Storage(U8),
        ("torch", _, Some(d), _) => Global::Storage(d),
        ("torch", _, _, Some(d)) => Global::Dtype(d),
        _ => {
            // Module classes are never instantiated: only their pickled __dict__ is read.
            let full = format!("{module}.{name}");
            let torch_nn = module.starts_with("torch.nn.modules.")
                && name.starts_with(|c: char| c.is_ascii_uppercase());
            let by_caller = allowed.iter().any(|a| match a.strip_suffix('*') {
                Some(p) => full.starts_with(p),
                None => *a == full,
            });
            return (torch_nn || by_caller).then(|| Global::Class(full.into()));
        }
    };
    Some(g)
}

/// The pickle virtual machine, minus everything that could execute code.
struct Machine<'a> {
    path: &'a Path,
    allowed: &'a [&'a str],
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>, // stack lengths at each MARK
    memo: HashMap<u32, Value>,
    heap: Vec<Obj>,
    items: usize,
}

impl<'a> Machine<'a> {
    fn fail<T>(&self, msg: impl Into<String>) -> R<T> {
        let (path, offset) = (self.path.to_owned(), self.pos);
        Err(PickleError::Pickle {
            path,
            offset,
            msg: msg.into(),
        })
    }
    /// `got`, or an error saying what was expected and what the pickle held instead.
    fn require<T>(&self, got: Option<T>, what: &str, found: Option<&Value>) -> R<T> {
        match got {
            Some(x) => Ok(x),
            None => self.fail(format!("expected {what}, found {}", self.describe(found))),
        }
    }
    fn describe(&self, v: Option<&Value>) -> String {
        let kind = match self.obj(v) {
            Some(Obj::Instance { class, .. }) => return format!("a `{class}` object"),
            Some(Obj::Tuple(_)) => "a tuple",
            Some(Obj::List(_)) => "a list",
            Some(Obj::Dict(_)) => "a dict",
            Some(Obj::Set(_)) => "a set",
            Some(Obj::Storage(_)) => "a storage",
            Some(Obj::Tensor(_)) => "a tensor",
            None => match v {
                Some(Value::Str(s)) => {
                    return format!("{:?}", s.chars().take(40).collect::<String>())
                }
                Some(v) => return format!("{v:?}"),
                None => "nothing",
            },
        };
        kind.into()
    }
    fn obj(&self, v: Option<&Value>) -> Option<&Obj> {
        match v {
            Some(Value::Ref(i)) => self.heap.get(*i),
            _ => None,
        }
    }
    fn seq(&self, v: Option<&Value>) -> Option<&[Value]> {
        match self.obj(v)? {
            Obj::Tuple(x) | Obj::List(x) => Some(x),
            _ => None,
        }
    }

    fn take(&mut self, n: u64) -> R<&'a [u8]> {
        let data = self.data;
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_add(self.pos));
        match end.and_then(|end| Some((end, data.get(self.pos..end)?))) {
            Some((end, s)) => {
                self.pos = end;
                Ok(s)
            }
            None => self.fail(format!("truncated: expected {n} more bytes")),
        }
    }
    /// Little-endian integer of `n` bytes (at most 8), sign-extended when `signed`.
    fn int(&mut self, n: u64, signed: bool) -> R<i64> {
        let b = self.take(n)?;
        let neg = signed && b.last().is_some_and(|x| x & 0x80 != 0);
        let mut buf = if neg { [0xFF; 8] } else { [0; 8] };
        if b.len() > 8 {
            return self.fail(format!("integer of {n} bytes, expected at most 8"));
        }
        buf.iter_mut().zip(b).for_each(|(d, s)| *d = *s);
        Ok(i64::from_le_bytes(buf))
    }
    fn len(&mut self, n: u64) -> R<u64> {
        self.int(n, false).map(|v| v as u64) // n <= 8 bytes: the bits are the length
    }
    fn line(&mut self) -> R<String> {
        let rest = self.data.get(self.pos..).unwrap_or(&[]);
        let Some(n) = rest.iter().take(1024).position(|&b| b == b'\n') else {
            return self.fail("expected a newline-terminated GLOBAL name within 1024 bytes");
        };
        let s = String::from_utf8_lossy(self.take(n as u64)?).into_owned();
        self.pos += 1;
        Ok(s)
    }
    fn alloc(&mut self, obj: Obj) -> R<Value> {
        let n = match &obj {
            Obj::Tuple(v) | Obj::List(v) | Obj::Set(v) => v.len(),
            Obj::Dict(v) => v.len(),
            _ => 0,
        };
        self.count(n)?;
        self.heap.push(obj);
        Ok(Value::Ref(self.heap.len() - 1))
    }
    fn count(&mut self, n: usize) -> R<()> {
        self.items = self.items.saturating_add(n).saturating_add(1);
        if self.items > MAX_ITEMS {
            return self.fail(format!("more than {MAX_ITEMS} objects"));
        }
        Ok(())
    }
    fn push(&mut self, v: Value) -> R<()> {
        if self.stack.len() >= MAX_STACK {
            return self.fail(format!("stack deeper than {MAX_STACK}"));
        }
        self.stack.push(v);
        Ok(())
    }
    /// Pops the top `n` values, in stack order; a MARK is a floor, as in CPython.
    fn pop_n(&mut self, n: usize) -> R<Vec<Value>> {
        let floor = self.marks.last().copied().unwrap_or(0);
        match self.stack.len().checked_sub(n) {
            Some(at) if at >= floor => Ok(self.stack.split_off(at)),
            _ => self.fail(format!(
                "stack underflow: expected {n} values above the last MARK"
            )),
        }
    }
    fn pop(&mut self) -> R<Value> {
        let v = self.pop_n(1)?.pop();
        self.require(v, "a value", None)
    }
    fn pop_mark(&mut self) -> R<Vec<Value>> {
        match self.marks.pop() {
            Some(m) if m <= self.stack.len() => Ok(self.stack.split_off(m)),
            _ => self.fail("expected a MARK on the stack, found none"),
        }
    }
    /// Heap index of the container on top of the stack (target of APPEND, SETITEM, BUILD).
    fn top_ref(&self) -> R<usize> {
        let above_mark = self.stack.len() > self.marks.last().copied().unwrap_or(0);
        match self.stack.last().filter(|_| above_mark) {
            Some(Value::Ref(i)) => Ok(*i),
            other => self.require(None, "a container on the stack", other),
        }
    }
    /// APPEND(S), ADDITEMS on a list or set; SETITEM(S) on a dict (`items` are key, value...).
    fn extend_top(&mut self, items: Vec<Value>) -> R<()> {
        let i = self.top_ref()?;
        self.count(items.len())?;
        match self.heap.get_mut(i) {
            Some(Obj::List(v) | Obj::Set(v)) => v.extend(items),
            Some(Obj::Dict(d)) if items.len().is_multiple_of(2) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
            }
            _ => {
                return self.require(
                    None,
                    "a list, set or dict (with key/value pairs)",
                    Some(&Value::Ref(i)),
                )
            }
        }
        Ok(())
    }
    fn usizes(&self, v: Option<&Value>, what: &str) -> R<Vec<usize>> {
        let seq = self.seq(v).filter(|s| s.len() <= MAX_NDIM);
        let ints: Option<Vec<usize>> = self
            .require(
                seq,
                &format!("{what} (a tuple of at most {MAX_NDIM} ints)"),
                v,
            )?
            .iter()
            .map(|x| match x {
                Value::Int(n) => usize::try_from(*n).ok(),
                _ => None,
            })
            .collect();
        self.require(ints, &format!("{what} of non-negative ints"), v)
    }

    /// `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, ...)`.
    fn rebuild_tensor(&mut self, args: &[Value]) -> R<Value> {
        let storage = match self.obj(args.first()) {
            Some(Obj::Storage(s)) => Some(s.clone()),
            _ => None,
        };
        let storage = self.require(storage, "a storage as tensor argument 0", args.first())?;
        let offset = match args.get(1) {
            Some(Value::Int(n)) => usize::try_from(*n).ok(),
            _ => None,
        };
        let offset = self.require(offset, "a non-negative storage offset", args.get(1))?;
        let shape = self.usizes(args.get(2), "tensor size")?;
        let stride = self.usizes(args.get(3), "tensor stride")?;
        if shape.len() != stride.len() {
            let (a, b) = (shape.len(), stride.len());
            return self.fail(format!("tensor has {a} dims but {b} strides"));
        }
        let es = storage.dtype.size_in_bytes();
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let sizes = (
            numel,
            numel.and_then(|n| n.checked_mul(es)),
            storage.numel.checked_mul(es),
        );
        let (Some(numel), Some(bytes), Some(storage_bytes)) = sizes else {
            return self.fail(format!("tensor size {shape:?} overflows"));
        };
        if numel > 0 {
            // The highest element index the view touches must lie inside the storage.
            let last = (shape.iter().zip(&stride))
                .try_fold(offset, |a, (&n, &s)| a.checked_add((n - 1).checked_mul(s)?));
            if last.is_none_or(|l| l >= storage.numel) {
                return self.fail(format!(
                    "tensor view (offset {offset}, size {shape:?}, stride {stride:?}) exceeds \
                     its storage of {} elements",
                    storage.numel
                ));
            }
            if bytes > storage_bytes && bytes > MAX_EXPANDED_BYTES {
                return self.fail(format!("tensor of {bytes} bytes expands a smaller storage"));
            }
        }
        self.alloc(Obj::Tensor(TensorMeta {
            storage,
            offset,
            shape,
            stride,
        }))
    }

    /// REDUCE / NEWOBJ: builds the inert equivalent of calling an allowed global.
    fn call(&mut self, f: Value, args: Value) -> R<Value> {
        let Value::Global(g) = f else {
            return self.require(None, "an allowed callable", Some(&f));
        };
        let args = self.seq(Some(&args)).map(<[Value]>::to_vec);
        let args = self.require(args, "an argument tuple", None)?;
        let items = (args
            .first()
            .and_then(|a| self.seq(Some(a)))
            .map(<[Value]>::to_vec))
        .unwrap_or_default();
        match g {
            Global::RebuildTensor => self.rebuild_tensor(&args),
            Global::RebuildParameter => self.require(args.first().cloned(), "parameter data", None),
            Global::Size => self.alloc(Obj::Tuple(items)),
            Global::Set => self.alloc(Obj::Set(items)),
            Global::OrderedDict => {
                let pairs = (items.iter())
                    .map(|p| match self.seq(Some(p)) {
                        Some([k, v]) => Some((k.clone(), v.clone())),
                        _ => None,
                    })
                    .collect();
                let pairs = self.require(pairs, "OrderedDict (key, value) pairs", None)?;
                self.alloc(Obj::Dict(pairs))
            }
            Global::Device => Ok(Value::Opaque),
            Global::Class(class) => self.alloc(Obj::Instance { class, state: None }),
            Global::Storage(_) | Global::Dtype(_) => self.fail(format!("{g:?} is not callable")),
        }
    }

    /// BINPERSID: ('storage', storage_type, key, location, numel) names zip entry data/<key>.
    fn persistent_load(&mut self, pid: Value) -> R<Value> {
        let what = "a persistent id ('storage', torch.<T>Storage, key, location, numel)";
        let t = self.require(self.seq(Some(&pid)), what, Some(&pid))?;
        let (key, numel) = match t {
            [Value::Str(tag), Value::Global(Global::Storage(dtype)), key, _, Value::Int(numel), ..]
                if &**tag == "storage" =>
            {
                let key: Rc<str> = match key {
                    Value::Str(s) => s.clone(),
                    Value::Int(n) => n.to_string().into(),
                    _ => "".into(),
                };
                ((key, *dtype), usize::try_from(*numel).ok())
            }
            _ => return self.require(None, what, Some(&pid)),
        };
        // Keys are decimal in practice; refuse anything that could name another entry.
        let ((key, dtype), numel) = (key, self.require(numel, "a storage numel", None)?);
        if key.is_empty() || key.len() > 64 || !key.chars().all(|c| c.is_ascii_alphanumeric()) {
            return self.fail(format!(
                "expected an alphanumeric storage key, found {key:?}"
            ));
        }
        self.alloc(Obj::Storage(StorageRef { key, dtype, numel }))
    }

    fn run(&mut self) -> R<Value> {
        loop {
            let op = self.len(1)? as u8;
            let v = match op {
                b'.' => return self.pop(), // STOP
                0x80 | 0x95 => {
                    self.take(if op == 0x80 { 1 } else { 8 })?; // PROTO n, FRAME len: no-ops
                    continue;
                }
                b'(' if self.marks.len() >= MAX_STACK => return self.fail("too many MARKs"),
                b'(' => {
                    self.marks.push(self.stack.len());
                    continue;
                }
                b'0' => {
                    // POP: pops the MARK itself when it is on top, as CPython does
                    if self.stack.len() > self.marks.last().copied().unwrap_or(0) {
                        self.pop()?;
                    } else {
                        self.pop_mark()?;
                    }
                    continue;
                }
                b'1' => {
                    self.pop_mark()?; // POP_MARK
                    continue;
                }
                b'2' => self.require(self.stack.last().cloned(), "a value to DUP", None)?,
                b'N' => Value::None,
                0x88 | 0x89 => Value::Bool(op == 0x88),
                b'J' => Value::Int(self.int(4, true)?),
                b'K' => Value::Int(self.int(1, false)?),
                b'M' => Value::Int(self.int(2, false)?),
                0x8a | 0x8b => {
                    // LONG1, LONG4: little-endian two's complement
                    let n = self.len(if op == 0x8a { 1 } else { 4 })?;
                    Value::Int(self.int(n, true)?)
                }
                b'G' => Value::Float(f64::from_bits(self.int(8, false)?.swap_bytes() as u64)),
                b'X' | 0x8c | 0x8d | b'T' | b'U' | b'B' | b'C' | 0x8e => {
                    // (SHORT_)BINUNICODE(8), (SHORT_)BINSTRING, (SHORT_)BINBYTES(8)
                    let width = match op {
                        0x8c | b'U' | b'C' => 1,
                        0x8d | 0x8e => 8,
                        _ => 4,
                    };
                    let n = self.len(width)?;
                    let s = self.take(n)?;
                    match op {
                        b'B' | b'C' | 0x8e => Value::Opaque, // bytes: never needed
                        _ => Value::Str(String::from_utf8_lossy(s).into()),
                    }
                }
                b')' | 0x85..=0x87 => {
                    let items = self.pop_n(usize::from(op.saturating_sub(0x84)))?;
                    self.alloc(Obj::Tuple(items))?
                }
                b']' => self.alloc(Obj::List(Vec::new()))?,
                b'}' => self.alloc(Obj::Dict(Vec::new()))?,
                0x8f => self.alloc(Obj::Set(Vec::new()))?,
                b't' | b'l' | 0x91 | b'd' => {
                    let items = self.pop_mark()?;
                    match op {
                        b't' => self.alloc(Obj::Tuple(items))?,
                        b'l' => self.alloc(Obj::List(items))?,
                        0x91 => self.alloc(Obj::Set(items))?,
                        _ => {
                            let d = self.alloc(Obj::Dict(Vec::new()))?;
                            self.push(d)?;
                            self.extend_top(items)?;
                            continue;
                        }
                    }
                }
                b'a' | b's' | b'e' | b'u' | 0x90 => {
                    // APPEND, SETITEM / APPENDS, SETITEMS, ADDITEMS
                    let items = match op {
                        b'a' => self.pop_n(1)?,
                        b's' => self.pop_n(2)?,
                        _ => self.pop_mark()?,
                    };
                    self.extend_top(items)?;
                    continue;
                }
                b'c' | 0x93 => {
                    let (module, name) = if op == b'c' {
                        (self.line()?, self.line()?) // GLOBAL
                    } else {
                        match (self.pop()?, self.pop()?) {
                            (Value::Str(n), Value::Str(m)) => (m.to_string(), n.to_string()),
                            _ => return self.fail("STACK_GLOBAL: expected two strings"),
                        }
                    };
                    let Some(g) = resolve_global(&module, &name, self.allowed) else {
                        let (path, global) = (self.path.to_owned(), format!("{module}.{name}"));
                        return Err(PickleError::RefusedGlobal { path, global });
                    };
                    Value::Global(g)
                }
                b'R' | 0x81 | 0x92 => {
                    // REDUCE, NEWOBJ, NEWOBJ_EX (its kwargs ignored)
                    let mut v = self.pop_n(if op == 0x92 { 3 } else { 2 })?;
                    v.truncate(2);
                    let args = self.require(v.pop(), "arguments", None)?;
                    let f = self.require(v.pop(), "a callable", None)?;
                    self.call(f, args)?
                }
                b'b' => {
                    // BUILD: keep an instance's __dict__; others (OrderedDict._metadata) drop it
                    let state = self.pop()?;
                    let i = self.top_ref()?;
                    if let Some(Obj::Instance { state: s, .. }) = self.heap.get_mut(i) {
                        *s = Some(state);
                    }
                    continue;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.persistent_load(pid)?
                }
                b'q' | b'r' | 0x94 => {
                    // BINPUT, LONG_BINPUT, MEMOIZE
                    let idx = match op {
                        b'q' => self.len(1)?,
                        b'r' => self.len(4)?,
                        _ => self.memo.len() as u64,
                    };
                    let top =
                        self.require(self.stack.last().cloned(), "a value to memoize", None)?;
                    if self.memo.len() >= MAX_MEMO {
                        return self.fail(format!("memo larger than {MAX_MEMO} entries"));
                    }
                    self.memo.insert(idx as u32, top);
                    continue;
                }
                b'h' | b'j' => {
                    // BINGET, LONG_BINGET
                    let idx = self.len(if op == b'h' { 1 } else { 4 })? as u32;
                    let v = self.memo.get(&idx).cloned();
                    self.require(v, &format!("memo entry {idx} to be set"), None)?
                }
                _ => {
                    self.pos = self.pos.saturating_sub(1);
                    return self.fail(format!("unsupported pickle opcode 0x{op:02x}"));
                }
            };
            self.push(v)?;
        }
    }
}

/// Collects (state_dict name, heap index) of every tensor reachable from the pickle's result.
struct Walker<'m> {
    heap: &'m [Obj],
    budget: usize, // node visits left: shared sub-graphs cannot blow up exponentially
    out: Vec<(String, usize)>,
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

impl<'m> Walker<'m> {
    fn dict(&self, v: &Value) -> Option<&'m [(Value, Value)]> {
        let Value::Ref(i) = v else { return None };
        match self.heap.get(*i)? {
            Obj::Dict(d) => Some(d),
            // BUILD state (dict, slots) of a class with __slots__.
            Obj::Tuple(t) => match (t.first(), self.heap) {
                (Some(Value::Ref(j)), heap) => match heap.get(*j)? {
                    Obj::Dict(d) => Some(d),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        }
    }

    fn walk(&mut self, v: &Value, name: &str, depth: usize) -> Result<(), String> {
        let Value::Ref(i) = v else { return Ok(()) };
        self.budget =
            (self.budget.checked_sub(1)).ok_or("object graph too large (shared references)")?;
        if depth > MAX_DEPTH {
            return Err(format!(
                "objects nested deeper than {MAX_DEPTH} levels (cyclic?)"
            ));
        }
        let heap = self.heap;
        match heap.get(*i) {
            Some(Obj::Tensor(_)) => {
                let name = if name.is_empty() { "tensor" } else { name };
                self.out.push((name.to_owned(), *i));
            }
            Some(Obj::Dict(d)) => {
                for (k, v) in d {
                    let key = match k {
                        Value::Str(s) => s.to_string(),
                        Value::Int(n) => n.to_string(),
                        _ => continue,
                    };
                    self.walk(v, &join(name, &key), depth + 1)?;
                }
            }
            Some(Obj::List(xs) | Obj::Tuple(xs)) => {
                for (k, v) in xs.iter().enumerate() {
                    self.walk(v, &join(name, &k.to_string()), depth + 1)?;
                }
            }
            Some(Obj::Instance { state: Some(s), .. }) => self.walk_module(s, name, depth + 1)?,
            _ => {}
        }
        Ok(())
    }

    /// An nn.Module's __dict__: parameters, persistent buffers, then submodules, in
    /// state_dict order. Other instances: their state is walked like a dict.
    fn walk_module(&mut self, state: &Value, name: &str, depth: usize) -> Result<(), String> {
        let Some(d) = self.dict(state) else {
            return self.walk(state, name, depth);
        };
        let field = |f: &str| {
            let mut hits = d
                .iter()
                .filter(|(k, _)| matches!(k, Value::Str(s) if &**s == f));
            hits.next_back().map(|(_, v)| v)
        };
        const FIELDS: [&str; 3] = ["_parameters", "_buffers", "_modules"];
        if FIELDS.iter().all(|f| field(f).is_none()) {
            return self.walk(state, name, depth);
        }
        let skip: HashSet<&str> = match field("_non_persistent_buffers_set") {
            Some(Value::Ref(i)) => match self.heap.get(*i) {
                Some(Obj::Set(xs) | Obj::List(xs)) => (xs.iter())
                    .filter_map(|x| match x {
                        Value::Str(s) => Some(&**s),
                        _ => None,
                    })
                    .collect(),
                _ => HashSet::new(),
            },
            _ => HashSet::new(),
        };
        for f in FIELDS {
            for (k, v) in field(f).and_then(|v| self.dict(v)).unwrap_or_default() {
                match k {
                    Value::Str(k) if !(f == "_buffers" && skip.contains(&**k)) => {
                        self.walk(v, &join(name, k), depth + 1)?
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/pickle/"
        ))
        .join(name)
    }

    /// `<fixture>.expected.tsv`: name, dtype, comma-separated shape, hex bytes.
    fn expected(name: &str) -> Tensors {
        use PtDtype::*;
        let dtypes = [F64, F32, F16, BF16, I64, I32, I16, I8, U8, Bool];
        let text = std::fs::read_to_string(fixture(&format!("{name}.expected.tsv"))).unwrap();
        let line = |l: &str| {
            let f: Vec<&str> = l.split('\t').collect();
            let dtype = *dtypes.iter().find(|d| format!("{d:?}") == f[1]).unwrap();
            let shape = f[2]
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap());
            let hex = |i| u8::from_str_radix(&f[3][i..i + 2], 16).unwrap();
            let data = (0..f[3].len()).step_by(2).map(hex).collect();
            (
                f[0].to_owned(),
                RawTensor {
                    dtype,
                    shape: shape.collect(),
                    data,
                },
            )
        };
        text.lines().map(line).collect()
    }

    fn err(name: &str) -> String {
        let e = read_torch_checkpoint(&fixture(name))
            .expect_err("must fail")
            .to_string();
        assert!(e.contains(name), "error should name the file: {e}");
        e
    }

    #[test]
    fn state_dict_all_dtypes_strides_offsets() {
        let got = read_torch_checkpoint(&fixture("state_dict.bin")).unwrap();
        assert_eq!(got, expected("state_dict.bin"));
        assert!(["transposed", "view_offset", "param"]
            .iter()
            .all(|n| got.iter().any(|t| t.0 == *n)));
        let proto4 = read_torch_checkpoint(&fixture("state_dict_proto4.bin")).unwrap();
        assert_eq!(proto4, got);
    }

    #[test]
    fn nested_dicts_and_whole_modules() {
        for name in ["nested.bin", "module.bin"] {
            assert_eq!(
                read_torch_checkpoint(&fixture(name)).unwrap(),
                expected(name),
                "{name}"
            );
        }
    }

    #[test]
    fn custom_module_class_needs_caller_allow_list() {
        let e = err("custom_module.bin");
        assert!(
            e.contains("refused pickle global `__main__.TinyNet`"),
            "{e}"
        );
        let path = fixture("custom_module.bin");
        let want = expected("custom_module.bin"); // without the non-persistent buffer
        assert_eq!(
            read_torch_checkpoint_with(&path, &["__main__.TinyNet"]).unwrap(),
            want
        );
        assert_eq!(
            read_torch_checkpoint_with(&path, &["__main__.*"]).unwrap(),
            want
        );
    }

    #[test]
    fn malicious_globals_are_refused() {
        let e = err("malicious.bin");
        assert!(e.contains("refused pickle global `posix.system`"), "{e}");
        let e = err("malicious_eval.bin");
        assert!(
            e.contains("refused pickle global `__builtin__.eval`"),
            "{e}"
        );
    }

    #[test]
    fn broken_files_give_clear_errors() {
        let cases = [
            ("empty.bin", "file is empty"),
            ("truncated.bin", "not a readable torch.save zip archive"),
            ("corrupted.bin", "checksum"),
            ("corrupted_pickle.bin", "data.pkl"), // a garbled opcode or GLOBAL name
            (
                "legacy.bin",
                "legacy (pre-1.6) torch.save format is not supported",
            ),
            ("no_tensors.bin", "no tensors found"),
            ("state_dict.bin.expected.tsv", "not a zip archive"),
            ("missing.bin", "cannot read file"),
        ];
        for (name, want) in cases {
            let e = err(name);
            let garbled_global = want == "data.pkl" && e.contains("refused pickle global");
            assert!(e.contains(want) || garbled_global, "{name}: {e}");
        }
    }

    /// Runs `pkl` against the storages of state_dict.bin.
    fn run(pkl: &[u8]) -> R<Tensors> {
        let path = fixture("state_dict.bin");
        let archive = ZipArchive::new(BufReader::new(File::open(&path).unwrap())).unwrap();
        let prefix = "state_dict/".into();
        load_pickle(
            &mut Zip {
                path: &path,
                archive,
                prefix,
                file_len: 1 << 20,
            },
            pkl,
            &[],
        )
    }

    #[test]
    fn mutated_pickles_never_panic() {
        for name in ["state_dict", "module", "state_dict_proto4"] {
            let path = fixture(&format!("{name}.bin"));
            let archive = ZipArchive::new(File::open(&path).unwrap()).unwrap();
            let prefix = format!("{name}/");
            let pkl = Zip {
                path: &path,
                archive,
                prefix,
                file_len: 1 << 20,
            }
            .read("data.pkl", None);
            let pkl = pkl.unwrap();
            for len in 0..pkl.len() {
                let _ = run(&pkl[..len]);
            }
            for i in 0..pkl.len() {
                for x in [0x01u8, 0x80, 0xFF] {
                    let mut m = pkl.clone();
                    m[i] ^= x;
                    let _ = run(&m);
                }
            }
        }
    }

    #[test]
    fn hostile_graphs_are_bounded() {
        let msg = |pkl: &[u8]| run(pkl).unwrap_err().to_string();
        // l = []; l.append(l): a cycle.
        assert!(msg(b"\x80\x02]q\x00h\x00a.").contains("nested deeper"));
        // x = (x, x) sixty times: 2^60 paths through a tiny graph.
        let laughs = [&b"\x80\x02]"[..], &b"q\x00h\x00\x86".repeat(60), b"."].concat();
        assert!(msg(&laughs).contains("too large"));
        // A view past the end of its 2-element storage.
        let oob = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage\
            ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQ\
            K\x01K\x02\x85K\x01\x85\x89)tR.";
        assert!(msg(oob).contains("exceeds its storage"), "{}", msg(oob));
        assert!(msg(b"\x80\x02.").contains("stack underflow"));
        assert!(msg(b"\x80\x02\xff").contains("unsupported pickle opcode 0xff"));
        let tensor = &b"ctorch._utils\n_rebuild_tensor_v2\n"[..];
        let big_long = [b"\x80\x02", tensor, b"\x8a\x09123456789."].concat();
        assert!(msg(&big_long).contains("integer of 9 bytes"));
    }
}
