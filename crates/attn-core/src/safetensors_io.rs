//! Weights to and from a safetensors file (PyTorch's and Hugging Face's format): its bytes -> a
//! [`StateDict`] ([`FromSafetensors`]), and a state dict -> the bytes of a file
//! ([`ToSafetensors`], F32, with string metadata). The one file IO is
//! [`write_safetensors`], which writes where its caller says, atomically.
//!
//! F32 tensors are taken as they are; F16 and BF16 are widened to F32 exactly; F64 is rounded
//! to the nearest F32 (attn computes in F32). Other dtypes (integers, booleans) are refused by
//! name, unless the caller skips them (`embeddings.position_ids` in BERT checkpoints is an
//! integer buffer, not a weight).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::{AttnError, Result, StateDict, Tensor};

/// Writing a [`StateDict`] as the bytes of a safetensors file: F32 tensors under their names,
/// and string metadata (the same tensors and metadata give the same bytes, whatever the order
/// the map was built in).
///
/// ```
/// use std::collections::BTreeMap;
/// use attn_core::{FromSafetensors, StateDict, Tensor, ToSafetensors};
/// let mut dict = StateDict::new();
/// dict.insert("w".into(), Tensor::new("w", vec![2], vec![1.0, 2.0]).unwrap());
/// let bytes = dict.to_safetensors(&BTreeMap::from([("note".into(), "hello".into())])).unwrap();
/// assert_eq!(StateDict::from_safetensors(&bytes).unwrap(), dict);
/// ```
pub trait ToSafetensors {
    /// The bytes of a safetensors file holding every tensor, with `metadata` (none when empty).
    fn to_safetensors(&self, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>>;
}

impl ToSafetensors for StateDict {
    fn to_safetensors(&self, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
        let tensors: Vec<(&str, &[usize], &[f32])> =
            self.iter().map(|(n, t)| (n.as_str(), t.shape(), t.data())).collect();
        f32_safetensors(&tensors, (!metadata.is_empty()).then_some(metadata))
    }
}

/// The bytes of a safetensors file of F32 `tensors` (name, shape, values), with `metadata` when
/// given (its keys written in sorted order, so the bytes do not depend on a map's order).
pub fn f32_safetensors(
    tensors: &[(&str, &[usize], &[f32])],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<Vec<u8>> {
    let bad = |e: safetensors::SafeTensorError| AttnError::Safetensors {
        what: format!("cannot write the tensors: {e}"),
    };
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, data)| data.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| Ok((*name, TensorView::new(Dtype::F32, shape.to_vec(), b)?)))
        .collect::<std::result::Result<_, safetensors::SafeTensorError>>()
        .map_err(bad)?;
    let map: Option<HashMap<String, String>> = metadata.map(|m| m.clone().into_iter().collect());
    let out = safetensors::serialize(views, map).map_err(bad)?;
    Ok(match metadata {
        Some(sorted) => metadata_in_key_order(out, sorted),
        None => out,
    })
}

/// Where an atomic write of `path` goes: `Some((temporary, destination))`, a temporary file
/// beside the destination that is then renamed over it, for a path that names a regular file
/// or nothing yet (a symbolic link is followed: the file it points to is replaced and the link
/// kept). `None` for a path that names anything else, to be written in place: a device such as
/// `/dev/null` or a pipe (renaming over `/dev/null` would replace the device with a file), a
/// dangling link (written through) or a folder (whose write fails, naming it).
pub fn atomic_destination(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let destination = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => std::fs::canonicalize(path).ok()?,
        _ => path.to_path_buf(),
    };
    if std::fs::metadata(&destination).is_ok_and(|meta| !meta.is_file()) {
        return None;
    }
    let name = destination
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = destination.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    Some((temporary, destination))
}

/// Writes `bytes` to `path` atomically through an [`AtomicFile`]: a reader never sees half a
/// file and an interrupted write loses nothing. A path that is not a regular file (`/dev/null`,
/// a pipe) is written in place ([`atomic_destination`]).
pub fn write_safetensors(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write(bytes)?;
    file.finish()
}

/// A file written a piece at a time through a temporary file beside `path`, renamed over it by
/// [`AtomicFile::finish`], so a reader never sees half of it and a failed run leaves the old
/// file, where [`atomic_destination`] says (a regular file, a new path or a link's target;
/// `/dev/null` or a pipe is written in place). Dropped unfinished, the temporary file is
/// removed.
#[derive(Debug)]
pub struct AtomicFile {
    file: Option<std::io::BufWriter<std::fs::File>>,
    /// The temporary file and the file it is renamed over; `None` for a path written in place.
    rename: Option<(PathBuf, PathBuf)>,
    path: PathBuf,
}

impl AtomicFile {
    /// Creates the temporary file (or opens the path written in place): a path that cannot be
    /// written fails here.
    pub fn create(path: &Path) -> Result<AtomicFile> {
        let rename = atomic_destination(path);
        let target = rename.as_ref().map_or(path, |(tmp, _)| tmp);
        let file = std::fs::File::create(target).map_err(|e| io_error("cannot write", path, e))?;
        Ok(AtomicFile {
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
            rename,
            path: path.to_path_buf(),
        })
    }

    /// The path given to [`AtomicFile::create`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `bytes`.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        let file = self.file.as_mut().expect("open until finish");
        file.write_all(bytes)
            .map_err(|e| io_error("cannot write", &self.path, e))
    }

    /// Flushes the file and renames it over the path (a failed rename removes it).
    pub fn finish(mut self) -> Result<()> {
        let file = self.file.take().expect("open until finish");
        let written = file
            .into_inner()
            .map_err(|e| io_error("cannot write", &self.path, e.into_error()));
        let Some((tmp, destination)) = &self.rename else {
            return written.map(drop);
        };
        let done = written.and_then(|file| {
            drop(file);
            std::fs::rename(tmp, destination).map_err(|e| AttnError::Safetensors {
                what: format!("cannot rename {} to {}: {e}", tmp.display(), destination.display()),
            })
        });
        if done.is_err() {
            let _ = std::fs::remove_file(tmp);
        }
        done
    }
}

impl Drop for AtomicFile {
    /// An unfinished temporary file is removed (a finished one was renamed).
    fn drop(&mut self) {
        if let (Some(_), Some((tmp, _))) = (self.file.take(), &self.rename) {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// `what path: e` as an error: errors name the path the caller gave, not the temporary file
/// beside it.
fn io_error(what: &str, path: &Path, e: std::io::Error) -> AttnError {
    AttnError::Safetensors {
        what: format!("{what} {}: {e}", path.display()),
    }
}

/// The file with its metadata's keys in sorted order: `safetensors::serialize` writes the
/// metadata map first in the header, in a `HashMap`'s order, which changes from process to
/// process, and a checkpoint must be the same bytes whenever it holds the same tensors. The
/// sorted object has the same keys and values, so the same length: the rest of the header and
/// the data offsets are untouched. (A header laid out otherwise is left as it is.)
fn metadata_in_key_order(mut file: Vec<u8>, sorted: &BTreeMap<String, String>) -> Vec<u8> {
    const START: &[u8] = b"{\"__metadata__\":";
    let Ok(object) = serde_json::to_vec(sorted) else {
        return file;
    };
    let n = u64::from_le_bytes(file[..8].try_into().expect("8 bytes")) as usize;
    let (from, to) = (8 + START.len(), 8 + START.len() + object.len());
    if !file[8..].starts_with(START) || to > 8 + n {
        return file;
    }
    let written: Option<BTreeMap<String, String>> = serde_json::from_slice(&file[from..to]).ok();
    if written.as_ref() == Some(sorted) {
        file[from..to].copy_from_slice(&object);
    }
    file
}

/// Reading a [`StateDict`] from the bytes of a safetensors file.
///
/// ```
/// use attn_core::{FromSafetensors, StateDict};
/// # let bytes = safetensors::serialize(
/// #     [("w", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &[0u8; 8]).unwrap())],
/// #     None,
/// # ).unwrap();
/// let dict = StateDict::from_safetensors(&bytes).unwrap();
/// assert_eq!(dict["w"].shape(), &[2]);
/// ```
pub trait FromSafetensors: Sized {
    /// Every tensor of the file, as F32.
    fn from_safetensors(bytes: &[u8]) -> Result<Self> {
        Self::from_safetensors_skipping(bytes, |_| false)
    }

    /// Every tensor whose name `skip` refuses, as F32 (skipped tensors may have any dtype).
    fn from_safetensors_skipping(bytes: &[u8], skip: impl Fn(&str) -> bool) -> Result<Self>;

    /// As [`from_safetensors_skipping`](Self::from_safetensors_skipping), except that BF16
    /// tensors keep their bits ([`Tensor::from_bf16_bits`], two bytes per value) instead of
    /// being widened: for a model that computes in bf16, whose weights then go from the file's
    /// bits to their packed form with no f32 copy ([`crate::pack_weight_of`]).
    fn from_safetensors_keeping_bf16(bytes: &[u8], skip: impl Fn(&str) -> bool) -> Result<Self>;
}

impl FromSafetensors for StateDict {
    fn from_safetensors_skipping(bytes: &[u8], skip: impl Fn(&str) -> bool) -> Result<Self> {
        read_state_dict(bytes, skip, false)
    }

    fn from_safetensors_keeping_bf16(bytes: &[u8], skip: impl Fn(&str) -> bool) -> Result<Self> {
        read_state_dict(bytes, skip, true)
    }
}

/// The tensors of a safetensors file's `bytes` that `skip` refuses, as F32 or, with
/// `keep_bf16`, BF16 ones as their bits.
fn read_state_dict(bytes: &[u8], skip: impl Fn(&str) -> bool, keep_bf16: bool) -> Result<StateDict> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| AttnError::Safetensors {
        what: format!("not a valid safetensors file: {e}"),
    })?;
    let mut dict = StateDict::new();
    for (name, view) in file.iter() {
        if skip(name) {
            continue;
        }
        let shape = view.shape().to_vec();
        let tensor = if keep_bf16 && view.dtype() == Dtype::BF16 {
            check_byte_count(name, Dtype::BF16, &shape, view.data().len(), 2)?;
            let bits = view
                .data()
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            Tensor::from_bf16_bits(name, shape, bits)?
        } else {
            let data =
                floats_to_f32(name, view.dtype(), &shape, view.data())?.ok_or_else(|| AttnError::Safetensors {
                    what: format!(
                        "tensor `{name}` has dtype {:?}, expected F32, F16, BF16 or F64",
                        view.dtype()
                    ),
                })?;
            Tensor::new(name, shape, data)?
        };
        dict.insert(name.to_string(), tensor);
    }
    Ok(dict)
}

/// Fails unless `len` bytes hold `shape`'s element count at `width` bytes each.
fn check_byte_count(name: &str, dtype: Dtype, shape: &[usize], len: usize, width: usize) -> Result<()> {
    let needed = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|c| c.checked_mul(width));
    if needed == Some(len) {
        return Ok(());
    }
    Err(AttnError::Safetensors {
        what: format!(
            "tensor `{name}` of dtype {dtype:?} and shape {shape:?} has {len} bytes, expected {}",
            needed.map_or("more than fit in memory".to_string(), |n| n.to_string())
        ),
    })
}

/// The elements of a float tensor as F32 (F16 and BF16 exactly, F64 rounded); `None` for a
/// dtype that is not a float. Fails when `bytes` does not hold `shape`'s element count.
pub fn floats_to_f32(name: &str, dtype: Dtype, shape: &[usize], bytes: &[u8]) -> Result<Option<Vec<f32>>> {
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        Dtype::F64 => 8,
        _ => return Ok(None),
    };
    check_byte_count(name, dtype, shape, bytes.len(), width)?;
    let data = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
            .collect(),
        _ => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
    };
    Ok(Some(data))
}

/// IEEE half precision to single, exactly (subnormals, infinities and NaN included).
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exponent = u32::from((h >> 10) & 0x1f);
    let mantissa = u32::from(h & 0x3ff);
    let bits = match (exponent, mantissa) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m · 2^-24, renormalised.
            let shift = m.leading_zeros() - 21;
            let m = (m << shift) & 0x3ff;
            sign | ((127 - 15 + 1 - shift) << 23) | (m << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_widens_exactly() {
        // Every finite half value against the definition m · 2^(e - 25) (or its subnormal form).
        for h in 0u16..=u16::MAX {
            let (e, m) = ((h >> 10) & 0x1f, f64::from(h & 0x3ff));
            let sign = if h >> 15 == 1 { -1.0 } else { 1.0 };
            let want = match e {
                0 => sign * m * 2f64.powi(-24),
                0x1f => continue,
                e => sign * (1024.0 + m) * 2f64.powi(i32::from(e) - 25),
            };
            assert_eq!(f64::from(f16_to_f32(h)), want, "{h:#06x}");
        }
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn dtypes_convert_and_others_are_refused_by_name() {
        let f16 = [0x00u8, 0x3c, 0x00, 0xc0]; // 1.0, -2.0
        let bf16 = [0x80u8, 0x3f, 0x40, 0x40]; // 1.0, 3.0
        let f64s: Vec<u8> = [0.1f64, -7.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let ints = [1u8, 0, 0, 0, 0, 0, 0, 0];
        fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> safetensors::tensor::TensorView<'_> {
            safetensors::tensor::TensorView::new(dtype, shape, data).unwrap()
        }
        let bytes = safetensors::serialize(
            [
                ("half", view(Dtype::F16, vec![2], &f16)),
                ("brain", view(Dtype::BF16, vec![2], &bf16)),
                ("double", view(Dtype::F64, vec![2], &f64s)),
                ("position_ids", view(Dtype::I64, vec![1], &ints)),
            ],
            None,
        )
        .unwrap();
        let err = StateDict::from_safetensors(&bytes).unwrap_err().to_string();
        assert!(err.contains("`position_ids`") && err.contains("I64"), "{err}");
        let dict = StateDict::from_safetensors_skipping(&bytes, |name| name == "position_ids").unwrap();
        assert_eq!(dict["half"].data(), &[1.0, -2.0]);
        assert_eq!(dict["brain"].data(), &[1.0, 3.0]);
        assert_eq!(dict["double"].data(), &[0.1f32, -7.0]);
        assert!(!dict["brain"].is_bf16());
        // Kept as bits: the same values, two bytes each, every other dtype as before.
        let kept = StateDict::from_safetensors_keeping_bf16(&bytes, |name| name == "position_ids").unwrap();
        assert_eq!(kept["brain"].bf16_bits(), Some(&[0x3f80u16, 0x4040][..]));
        assert_eq!(kept["brain"].bytes_held(), 4);
        assert_eq!(kept["brain"], dict["brain"]);
        assert_eq!(kept["brain"].bytes_held(), 4, "comparing does not widen");
        assert!(!kept["half"].is_bf16() && !kept["double"].is_bf16());
        assert_eq!(kept["half"], dict["half"]);
        // 2^62 elements fit a usize, their 2^65 bytes do not: an error, not an overflow.
        let err = floats_to_f32("huge", Dtype::F64, &[1 << 31, 1 << 31], &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`huge`") && err.contains("more than fit in memory"),
            "{err}"
        );
        let err = StateDict::from_safetensors(b"not a file").unwrap_err().to_string();
        assert!(err.contains("not a valid safetensors file"), "{err}");
    }

    #[test]
    fn files_with_metadata_are_the_same_bytes_every_time() {
        let data = [1.0f32, 2.0, 3.0];
        let tensors: [(&str, &[usize], &[f32]); 2] = [("b", &[3], &data), ("a", &[1, 3], &data)];
        let metadata: BTreeMap<String, String> = (0..8).map(|i| (format!("key{i}"), format!("value {i}"))).collect();
        let first = f32_safetensors(&tensors, Some(&metadata)).unwrap();
        // safetensors writes the metadata in a HashMap's order, new each call: sorted here.
        for _ in 0..16 {
            assert_eq!(f32_safetensors(&tensors, Some(&metadata)).unwrap(), first);
        }
        let parsed = SafeTensors::deserialize(&first).unwrap();
        assert_eq!(parsed.tensor("a").unwrap().shape(), &[1, 3]);
        let (_, meta) = SafeTensors::read_metadata(&first).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["key7"], "value 7");
        let header = String::from_utf8_lossy(&first[8..200]).to_string();
        assert!(
            header.starts_with(r#"{"__metadata__":{"key0":"value 0","key1""#),
            "{header}"
        );
        // One key has one order: the bytes are safetensors' own (files written before keep
        // their bytes).
        let one = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let views = vec![
            ("b", TensorView::new(Dtype::F32, vec![3], &bytes).unwrap()),
            ("a", TensorView::new(Dtype::F32, vec![1, 3], &bytes).unwrap()),
        ];
        let plain = safetensors::serialize(views, Some(HashMap::from([("k".to_string(), "v".to_string())]))).unwrap();
        assert_eq!(f32_safetensors(&tensors, Some(&one)).unwrap(), plain);
        // A state dict with no metadata writes none (no empty `__metadata__`): safetensors'
        // own bytes without it.
        let mut dict = StateDict::new();
        for (name, shape, values) in tensors {
            dict.insert(
                name.into(),
                crate::Tensor::new(name, shape.to_vec(), values.to_vec()).unwrap(),
            );
        }
        let views = vec![
            ("b", TensorView::new(Dtype::F32, vec![3], &bytes).unwrap()),
            ("a", TensorView::new(Dtype::F32, vec![1, 3], &bytes).unwrap()),
        ];
        let bare = safetensors::serialize(views, None).unwrap();
        assert_eq!(dict.to_safetensors(&BTreeMap::new()).unwrap(), bare);
        // Written atomically and read back.
        let path = std::env::temp_dir().join(format!("attn-core-write-{}.safetensors", std::process::id()));
        write_safetensors(&path, &first).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), first);
        std::fs::remove_file(&path).unwrap();
        let err = write_safetensors(Path::new("/nonexistent-folder/x.safetensors"), &first).unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot write /nonexistent-folder/x.safetensors: "),
            "{err}"
        );
    }

    /// A regular file (or a new path) is replaced through a temporary file beside it, a link's
    /// target is replaced and the link kept, and a pipe or a device is written in place: a
    /// rename over `/dev/null` would have put a file where the device was.
    #[test]
    fn atomic_writes_replace_files_and_write_pipes_in_place() {
        use std::os::unix::fs::FileTypeExt;
        let dir = std::env::temp_dir().join(format!("attn-core-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (file, link, pipe) = (dir.join("f.safetensors"), dir.join("link"), dir.join("pipe"));
        let (temporary, destination) = atomic_destination(&file).unwrap();
        assert_eq!(destination, file);
        assert_eq!(
            temporary,
            dir.join(format!(".f.safetensors.tmp-{}", std::process::id()))
        );
        std::fs::write(&file, b"old").unwrap();
        std::os::unix::fs::symlink(&file, &link).unwrap();
        write_safetensors(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
        assert_eq!(atomic_destination(Path::new("/dev/null")), None);
        assert_eq!(atomic_destination(&dir), None);
        let err = write_safetensors(&dir, b"x").unwrap_err().to_string();
        assert!(err.contains(&format!("cannot write {}", dir.display())), "{err}");
        let made = std::process::Command::new("mkfifo").arg(&pipe).status().unwrap();
        assert!(made.success());
        assert_eq!(atomic_destination(&pipe), None);
        let reader = {
            let pipe = pipe.clone();
            std::thread::spawn(move || std::fs::read(pipe).unwrap())
        };
        write_safetensors(&pipe, b"through the pipe").unwrap();
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        assert!(std::fs::metadata(&pipe).unwrap().file_type().is_fifo());
        let mut left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["f.safetensors", "link", "pipe"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
