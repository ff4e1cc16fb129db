//! NumPy .npy files: the inputs and outputs of the command line. Only what numpy writes for plain arrays
//! (versions 1-3, C order, little-endian or byte-sized dtypes); anything else is refused with a reason.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{BeitError, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Largest array we read: the same bound as a checkpoint's (4 GiB).
pub const MAX_NPY_BYTES: usize = 1 << 32;

/// The elements of a .npy array.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    /// float32
    F32(Vec<f32>),
    /// float64
    F64(Vec<f64>),
    /// int64
    I64(Vec<i64>),
    /// int32
    I32(Vec<i32>),
    /// uint8
    U8(Vec<u8>),
    /// bool, one byte each
    Bool(Vec<u8>),
}

/// A .npy array: shape and elements.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Elements, row-major.
    pub data: NpyData,
}

fn err(path: &Path, message: impl Into<String>) -> BeitError {
    BeitError::Npy { path: path.to_path_buf(), message: message.into() }
}

/// The value of `key` in numpy's header dict (a Python literal), as raw text.
fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[start..].trim_start().strip_prefix(':')?.trim_start();
    let end = if rest.starts_with('(') { rest.find(')')? + 1 } else { rest.find([',', '}'])? };
    Some(rest[..end].trim())
}

/// Reads a .npy file (little-endian f32, f64, i64, i32, u8 or bool; C order).
pub fn read_npy(path: &Path) -> Result<NpyArray> {
    let bytes = std::fs::read(path).map_err(|e| BeitError::io(path, e))?;
    parse_npy(&bytes).map_err(|m| err(path, m))
}

/// Parses .npy bytes; the error says what was wrong.
pub fn parse_npy(bytes: &[u8]) -> std::result::Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (bad magic)".into());
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes.get(start..start.saturating_add(header_len)).ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let descr = header_value(header, "descr").ok_or("header has no 'descr'")?.trim_matches(['\'', '"']);
    if header_value(header, "fortran_order") != Some("False") {
        return Err("Fortran-ordered arrays are not supported; save with np.ascontiguousarray".into());
    }
    let shape_text = header_value(header, "shape").ok_or("header has no 'shape'")?;
    let shape = shape_text
        .trim_matches(['(', ')'])
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad shape {shape_text}")))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("shape overflows")?;
    let body = &bytes[start + header_len..];
    let (size, kind) = match descr {
        "<f4" => (4, "f32"),
        "<f8" => (8, "f64"),
        "<i8" => (8, "i64"),
        "<i4" => (4, "i32"),
        "|u1" => (1, "u8"),
        "|b1" => (1, "bool"),
        other => return Err(format!("dtype {other} is not supported (use float32, float64, int64, int32, uint8 or bool)")),
    };
    let need = count.checked_mul(size).filter(|&n| n <= MAX_NPY_BYTES).ok_or("array is too large")?;
    if body.len() != need {
        return Err(format!("data holds {} bytes, the header's shape {shape:?} of {descr} needs {need}", body.len()));
    }
    let data = match kind {
        "f32" => NpyData::F32(body.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
        "f64" => NpyData::F64(
            body.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect(), // ok: chunks are 8 bytes
        ),
        "i64" => NpyData::I64(
            body.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect(), // ok: chunks are 8 bytes
        ),
        "i32" => NpyData::I32(body.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
        "u8" => NpyData::U8(body.to_vec()),
        _ => NpyData::Bool(body.to_vec()),
    };
    Ok(NpyArray { shape, data })
}

impl NpyArray {
    /// As a float32 tensor; NaN or infinite values are refused.
    pub fn to_f32_tensor(&self, path: &Path, device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = match &self.data {
            NpyData::F32(v) => v.clone(),
            NpyData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            _ => return Err(err(path, "expected float32 or float64 values")),
        };
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(err(path, format!("value {} at flat index {i} is not finite", v[i])));
        }
        Ok(Tensor::from_vec(v, self.shape.clone(), device)?)
    }

    /// As a 0/1 mask tensor (u8), from bool or integer arrays holding only 0 and 1.
    pub fn to_mask_tensor(&self, path: &Path, device: &Device) -> Result<Tensor> {
        let v: Vec<i64> = match &self.data {
            NpyData::Bool(v) | NpyData::U8(v) => v.iter().map(|&x| x as i64).collect(),
            NpyData::I64(v) => v.clone(),
            NpyData::I32(v) => v.iter().map(|&x| x as i64).collect(),
            _ => return Err(err(path, "expected a bool or 0/1 integer mask, found floating-point values")),
        };
        if let Some(bad) = v.iter().find(|&&x| x != 0 && x != 1) {
            return Err(err(path, format!("mask values must be 0 or 1, found {bad}")));
        }
        let v: Vec<u8> = v.into_iter().map(|x| x as u8).collect();
        Ok(Tensor::from_vec(v, self.shape.clone(), device)?)
    }
}

/// Writes a float32 array.
pub fn write_npy_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    write_npy(path, "<f4", shape, &data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
}

/// Writes an int64 .npy file.
pub fn write_npy_i64(path: &Path, shape: &[usize], data: &[i64]) -> Result<()> {
    write_npy(path, "<i8", shape, &data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
}

fn write_npy(path: &Path, descr: &str, shape: &[usize], body: &[u8]) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Pad so that the data starts on a 64-byte boundary, as numpy does.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body);
    std::fs::write(path, out).map_err(|e| BeitError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let dir = std::env::temp_dir().join(format!("beit-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.npy");
        write_npy_f32(&p, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let a = read_npy(&p).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, NpyData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        let bytes = std::fs::read(&p).unwrap();
        assert!(parse_npy(&bytes[..bytes.len() - 1]).unwrap_err().contains("needs 24"));
        assert!(parse_npy(b"hello world").is_err());
        assert!(parse_npy(&[]).is_err());
        write_npy_f32(&p, &[2], &[1.0, f32::NAN]).unwrap();
        let e = read_npy(&p).unwrap().to_f32_tensor(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("not finite") && e.contains("a.npy"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
