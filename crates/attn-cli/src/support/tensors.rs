//! Reading and writing tensors in safetensors files, with errors that name the file and tensor.
//!
//! Every file is untrusted: the safetensors crate checks the header and offsets, and this module
//! checks dtypes, element counts (with overflow checks) and boolean bytes before anything is
//! allocated from a number in the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use attn_nn::core::AtomicFile;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

/// A tensor read from a file: its shape and f32 or boolean data.
#[derive(Debug, Clone)]
pub enum Tensor {
    /// `F32` data.
    F32 { shape: Vec<usize>, data: Vec<f32> },
    /// `BOOL` data.
    Bool { shape: Vec<usize>, data: Vec<bool> },
    /// `BF16` values as their bits: only in a module's weights read for bf16
    /// ([`TensorFile::read_weights`]), which keep them unwidened.
    Bf16 { shape: Vec<usize>, bits: Vec<u16> },
}

impl Tensor {
    /// The file's name for the dtype: `F32`, `BOOL` or `BF16`.
    pub fn dtype_name(&self) -> &'static str {
        match self {
            Tensor::F32 { .. } => "F32",
            Tensor::Bool { .. } => "BOOL",
            Tensor::Bf16 { .. } => "BF16",
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32 { shape, .. } | Tensor::Bool { shape, .. } | Tensor::Bf16 { shape, .. } => shape,
        }
    }
}

/// The tensors of one safetensors file, by name.
pub struct TensorFile {
    path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
}

fn element_count(path: &Path, name: &str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .with_context(|| {
            format!(
                "{}: tensor `{name}` has shape {shape:?}, whose element count overflows",
                path.display()
            )
        })
}

fn decode(path: &Path, name: &str, view: &TensorView<'_>, keep_bf16: bool) -> Result<Tensor> {
    let shape = view.shape().to_vec();
    let count = element_count(path, name, &shape)?;
    let bytes = view.data();
    match view.dtype() {
        Dtype::F32 => {
            if bytes.len() != count * 4 {
                bail!(
                    "{}: tensor `{name}` of shape {shape:?} needs {} bytes, has {}",
                    path.display(),
                    count * 4,
                    bytes.len()
                );
            }
            let data = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok(Tensor::F32 { shape, data })
        }
        Dtype::BOOL => {
            if bytes.len() != count {
                bail!(
                    "{}: tensor `{name}` of shape {shape:?} needs {count} bytes, has {}",
                    path.display(),
                    bytes.len()
                );
            }
            let data = bytes
                .iter()
                .map(|&b| match b {
                    0 => Ok(false),
                    1 => Ok(true),
                    other => Err(other),
                })
                .collect::<std::result::Result<Vec<bool>, u8>>()
                .map_err(|byte| {
                    anyhow::anyhow!(
                        "{}: tensor `{name}` is BOOL but holds the byte {byte}, expected 0 or 1",
                        path.display()
                    )
                })?;
            Ok(Tensor::Bool { shape, data })
        }
        Dtype::BF16 if keep_bf16 => {
            if bytes.len() != count * 2 {
                bail!(
                    "{}: tensor `{name}` of shape {shape:?} needs {} bytes, has {}",
                    path.display(),
                    count * 2,
                    bytes.len()
                );
            }
            let bits = bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            Ok(Tensor::Bf16 { shape, bits })
        }
        other @ (Dtype::F16 | Dtype::BF16 | Dtype::F64) => bail!(
            "{}: tensor `{name}` has dtype {other:?}, expected F32 or BOOL (attn computes in F32 and does not \
             round inputs silently); convert the file with: python3 -c \"import sys; from safetensors.torch \
             import load_file, save_file; save_file({{k: v.float() if v.is_floating_point() else v for k, v in \
             load_file(sys.argv[1]).items()}}, sys.argv[2])\" {} OUT.safetensors",
            path.display(),
            path.display()
        ),
        other => bail!(
            "{}: tensor `{name}` has dtype {other:?}, expected F32 or BOOL",
            path.display()
        ),
    }
}

impl TensorFile {
    /// Reads and validates every tensor of `path`.
    pub fn read(path: &Path) -> Result<Self> {
        Self::read_skipping(path, |_| false)
    }

    /// Like [`TensorFile::read`], leaving out the tensors whose name `skip` accepts (whatever
    /// their dtype).
    pub fn read_skipping(path: &Path, skip: impl Fn(&str) -> bool) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(path, &bytes, skip)
    }

    /// Validates `bytes` as the contents of the safetensors file `path` (which errors name),
    /// leaving out the tensors whose name `skip` accepts.
    pub fn parse(path: &Path, bytes: &[u8], skip: impl Fn(&str) -> bool) -> Result<Self> {
        Self::parse_with(path, bytes, skip, false)
    }

    /// Reads a module's weights: as [`TensorFile::read`], and with `keep_bf16` BF16 tensors are
    /// accepted and kept as their bits ([`Tensor::Bf16`]; a module computing in bf16 packs them
    /// without an f32 copy).
    pub fn read_weights(path: &Path, keep_bf16: bool) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse_with(path, &bytes, |_| false, keep_bf16)
    }

    fn parse_with(path: &Path, bytes: &[u8], skip: impl Fn(&str) -> bool, keep_bf16: bool) -> Result<Self> {
        let parsed = SafeTensors::deserialize(bytes)
            .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in parsed.iter() {
            if skip(name) {
                continue;
            }
            tensors.insert(name.to_string(), decode(path, name, &view, keep_bf16)?);
        }
        Ok(TensorFile {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// Fails unless every tensor of the file is named in `allowed`.
    pub fn only(&self, allowed: &[&str]) -> Result<()> {
        if let Some(extra) = self.tensors.keys().find(|k| !allowed.contains(&k.as_str())) {
            bail!(
                "{}: unexpected tensor `{extra}` (this command reads {})",
                self.path.display(),
                allowed.join(", ")
            );
        }
        Ok(())
    }

    /// Every tensor, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.tensors.iter()
    }

    /// The file the tensors came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The F32 tensor `name` with `rank` dimensions; `what` describes the expected shape.
    pub fn f32(&self, name: &str, rank: usize, what: &str) -> Result<(&[usize], &[f32])> {
        match self.tensors.get(name) {
            None => bail!("{}: missing tensor `{name}`, expected {what}", self.path.display()),
            Some(other @ (Tensor::Bool { .. } | Tensor::Bf16 { .. })) => bail!(
                "{}: tensor `{name}` has dtype {}, expected F32 {what}",
                self.path.display(),
                other.dtype_name()
            ),
            Some(Tensor::F32 { shape, data }) => {
                if shape.len() != rank {
                    bail!(
                        "{}: tensor `{name}` has shape {shape:?}, expected {what}",
                        self.path.display()
                    );
                }
                Ok((shape, data))
            }
        }
    }
}

/// Writes F32 tensors to `path`, atomically (attn-core's `AtomicFile`) and a piece at a time: the bytes
/// `safetensors::serialize` gives (tensors in name order), without the two whole copies of the
/// data it builds first. Data whose length is not its shape's is an error naming the tensor.
pub fn write_f32(path: &Path, tensors: &[(&str, &[usize], &[f32])]) -> Result<()> {
    let shapes: Vec<(&str, &[usize])> = tensors.iter().map(|(name, shape, _)| (*name, *shape)).collect();
    let (header, order) = f32_header(path, &shapes)?;
    for (name, shape, data) in tensors {
        // The header counted every shape's bytes without overflow.
        let count: usize = shape.iter().product();
        if count != data.len() {
            bail!(
                "{}: tensor `{name}` has {} values, its shape {shape:?} needs {count}",
                path.display(),
                data.len()
            );
        }
    }
    let mut file = AtomicFile::create(path)?;
    file.write(&header)?;
    for i in order {
        for piece in tensors[i].2.chunks(1 << 16) {
            file.write(&piece.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?;
        }
    }
    Ok(file.finish()?)
}

/// The header of a safetensors file of F32 tensors `(name, shape)`, length first, as
/// `safetensors::serialize` writes it (from the crate's own `Metadata`, padded with spaces to
/// 8 bytes), and the order their data follows it in: by name.
fn f32_header(path: &Path, tensors: &[(&str, &[usize])]) -> Result<(Vec<u8>, Vec<usize>)> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].0);
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for &i in &order {
        let (name, shape) = tensors[i];
        let end = shape
            .iter()
            .try_fold(4usize, |n, &d| n.checked_mul(d))
            .and_then(|bytes| offset.checked_add(bytes));
        let Some(end) = end else {
            bail!(
                "{}: a tensor of shape {shape:?} has more bytes than a file can hold",
                path.display()
            );
        };
        let info = safetensors::tensor::TensorInfo {
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            data_offsets: (offset, end),
        };
        infos.push((name.to_string(), info));
        offset = end;
    }
    let metadata = safetensors::tensor::Metadata::new(None, infos)
        .with_context(|| format!("{}: the header of tensors {order:?}", path.display()))?;
    let mut header = serde_json::to_string(&metadata)?.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    Ok((out, order))
}

/// One F32 tensor written to a safetensors file as its values arrive, so that no more than a
/// write's worth is ever held: `attn embed` over ten million sentences writes 15 GB of rows.
/// The file is attn-core's `AtomicFile`; the bytes are those [`write_f32`] writes for the same tensor.
#[derive(Debug)]
pub struct StreamedF32 {
    file: AtomicFile,
    /// Values still to come.
    left: usize,
}

impl StreamedF32 {
    /// Creates the file and writes the header of tensor `name` of `shape`: a path that cannot
    /// be written fails here, before any work.
    pub fn create(path: &Path, name: &str, shape: &[usize]) -> Result<StreamedF32> {
        let (header, _) = f32_header(path, &[(name, shape)])?;
        let count = shape.iter().product();
        let mut file = AtomicFile::create(path)?;
        file.write(&header)?;
        Ok(StreamedF32 { file, left: count })
    }

    /// Appends `values`; more than the shape holds is an error.
    pub fn write(&mut self, values: &[f32]) -> Result<()> {
        if values.len() > self.left {
            bail!(
                "{}: more values than the tensor's shape holds",
                self.file.path().display()
            );
        }
        self.left -= values.len();
        let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        Ok(self.file.write(&bytes)?)
    }

    /// Renames the finished file over the path; fewer values than the shape holds is an error
    /// (and nothing is renamed).
    pub fn finish(self) -> Result<()> {
        if self.left > 0 {
            bail!(
                "{}: {} values short of the tensor's shape",
                self.file.path().display(),
                self.left
            );
        }
        Ok(self.file.finish()?)
    }
}

/// Writes F32 tensors and string metadata atomically ([`attn_nn::core::write_safetensors`]).
pub fn write_f32_atomic(
    path: &Path,
    tensors: &[(&str, &[usize], &[f32])],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let sorted: Option<std::collections::BTreeMap<String, String>> = metadata.map(|m| m.into_iter().collect());
    let out = attn_nn::core::f32_safetensors(tensors, sorted.as_ref())?;
    Ok(attn_nn::core::write_safetensors(path, &out)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn valid_file() -> Vec<u8> {
        let data: Vec<u8> = (0..24).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let mask = [1u8, 0, 1, 1, 0, 1];
        let views = vec![
            ("q", TensorView::new(Dtype::F32, vec![1, 2, 3, 4], &data).unwrap()),
            ("mask", TensorView::new(Dtype::BOOL, vec![2, 3], &mask).unwrap()),
        ];
        safetensors::serialize(views, None).unwrap()
    }

    /// `write_f32` and a streamed tensor are the bytes of `safetensors::serialize` (through
    /// `f32_safetensors`), whatever the tensors' order and the pieces; data that does not fit
    /// its shape is refused; a file not finished, or given too few or too many values, leaves
    /// nothing behind; a path that cannot be written fails before any value.
    #[test]
    fn streamed_tensors_are_the_bytes_written_whole() {
        let dir = std::env::temp_dir().join(format!("attn-streamed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (whole, streamed) = (dir.join("whole.safetensors"), dir.join("streamed.safetensors"));
        let serialized = |tensors: &[(&str, &[usize], &[f32])]| attn_nn::core::f32_safetensors(tensors, None).unwrap();
        let big: Vec<f32> = (0..200_000).map(|i| i as f32).collect();
        let tensors: [(&str, &[usize], &[f32]); 4] = [
            ("out", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            ("lse", &[2], &[-1.0, f32::NAN]),
            ("a", &[200_000], &big),
            ("empty", &[0, 7], &[]),
        ];
        write_f32(&whole, &tensors).unwrap();
        assert_eq!(std::fs::read(&whole).unwrap(), serialized(&tensors));
        let err = write_f32(&whole, &[("x", &[2, 2], &[1.0; 3])]).unwrap_err().to_string();
        assert!(
            err.ends_with("tensor `x` has 3 values, its shape [2, 2] needs 4"),
            "{err}"
        );
        for (rows, cols, piece) in [(0, 384, 1), (1, 1, 1), (3, 5, 2), (7, 384, 3), (1000, 3, 333)] {
            let values: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
            write_f32(&whole, &[("embeddings", &[rows, cols], &values)]).unwrap();
            let mut out = StreamedF32::create(&streamed, "embeddings", &[rows, cols]).unwrap();
            for part in values.chunks(piece * cols) {
                out.write(part).unwrap();
            }
            out.finish().unwrap();
            let want = serialized(&[("embeddings", &[rows, cols], &values)]);
            assert_eq!(std::fs::read(&streamed).unwrap(), want, "{rows}x{cols}");
            assert_eq!(std::fs::read(&whole).unwrap(), want, "{rows}x{cols}");
        }
        let listing = || {
            let mut names: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let before = std::fs::read(&streamed).unwrap();
        let mut out = StreamedF32::create(&streamed, "x", &[2, 2]).unwrap();
        out.write(&[1.0; 3]).unwrap();
        let err = out.write(&[1.0; 2]).unwrap_err().to_string();
        assert!(err.ends_with("more values than the tensor's shape holds"), "{err}");
        let err = out.finish().unwrap_err().to_string();
        assert!(err.ends_with("1 values short of the tensor's shape"), "{err}");
        let mut out = StreamedF32::create(&streamed, "x", &[2, 2]).unwrap();
        out.write(&[1.0; 4]).unwrap();
        drop(out);
        assert_eq!(listing(), ["streamed.safetensors", "whole.safetensors"]);
        assert_eq!(std::fs::read(&streamed).unwrap(), before);
        // Through a link its target is replaced; a pipe (as `/dev/null`, a device, would be) is
        // written in place and stays a pipe.
        let link = dir.join("link");
        std::os::unix::fs::symlink(&whole, &link).unwrap();
        let mut out = StreamedF32::create(&link, "x", &[1]).unwrap();
        out.write(&[2.0]).unwrap();
        out.finish().unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        let file = TensorFile::parse(&whole, &std::fs::read(&whole).unwrap(), |_| false).unwrap();
        assert_eq!(file.f32("x", 1, "[1]").unwrap().1, [2.0]);
        std::fs::remove_file(&link).unwrap();
        let pipe = dir.join("pipe");
        assert!(std::process::Command::new("mkfifo")
            .arg(&pipe)
            .status()
            .unwrap()
            .success());
        let reader = {
            let pipe = pipe.clone();
            std::thread::spawn(move || std::fs::read(pipe).unwrap())
        };
        let mut out = StreamedF32::create(&pipe, "embeddings", &[1000, 3]).unwrap();
        let values: Vec<f32> = (0..3000).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
        out.write(&values).unwrap();
        out.finish().unwrap();
        write_f32(&whole, &[("embeddings", &[1000, 3], &values)]).unwrap();
        assert_eq!(reader.join().unwrap(), std::fs::read(&whole).unwrap());
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::metadata(&pipe).unwrap().file_type().is_fifo());
        std::fs::remove_file(&pipe).unwrap();
        let err = StreamedF32::create(&dir.join("no/such/dir.safetensors"), "x", &[1]).unwrap_err();
        assert!(format!("{err:#}").contains("cannot write"), "{err:#}");
        let err = StreamedF32::create(&streamed, "x", &[usize::MAX, 2])
            .unwrap_err()
            .to_string();
        assert!(err.contains("more bytes than a file can hold"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A tensor of the wrong dtype is named with the file's name for its dtype: `BOOL` where F32
    /// was expected, and `BF16` for a weight kept as bf16 bits; a BF16 input is refused.
    #[test]
    fn wrong_dtypes_are_named_as_the_file_names_them() {
        let path = Path::new("in.safetensors");
        let file = TensorFile::parse_with(path, &valid_file(), |_| false, false).unwrap();
        let err = file.f32("mask", 2, "[2, 3]").unwrap_err().to_string();
        assert_eq!(err, "in.safetensors: tensor `mask` has dtype BOOL, expected F32 [2, 3]");
        let bits: Vec<u8> = [0x3f80u16, 0x4000].iter().flat_map(|b| b.to_le_bytes()).collect();
        let bf16 =
            safetensors::serialize(vec![("w", TensorView::new(Dtype::BF16, vec![2], &bits).unwrap())], None).unwrap();
        let file = TensorFile::parse_with(path, &bf16, |_| false, true).unwrap();
        let err = file.f32("w", 1, "[2]").unwrap_err().to_string();
        assert!(err.contains("has dtype BF16, expected F32"), "{err}");
        assert_eq!(file.get("w").unwrap().dtype_name(), "BF16");
        // Outside a module's weights read for bf16, BF16 is refused with the way to convert it.
        let err = TensorFile::parse(path, &bf16, |_| false)
            .err()
            .expect("BF16 refused")
            .to_string();
        assert!(
            err.contains("has dtype BF16, expected F32 or BOOL") && err.contains("v.float()"),
            "{err}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
        /// Quick fuzz of the loader: any flipped, cut or overwritten bytes give `Ok` or a typed
        /// error, never a panic.
        #[test]
        fn corrupted_files_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8), cut in any::<prop::sample::Index>(), do_cut in any::<bool>()) {
            let mut bytes = valid_file();
            for (index, value) in edits {
                let i = index.index(bytes.len());
                bytes[i] = value;
            }
            if do_cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            let path = std::env::temp_dir().join(format!("attn-fuzz-{}-{:?}.safetensors", std::process::id(), std::thread::current().id()));
            std::fs::write(&path, &bytes).unwrap();
            let read = std::panic::catch_unwind(|| TensorFile::read(&path).is_ok());
            std::fs::remove_file(&path).unwrap();
            prop_assert!(read.is_ok(), "reading a corrupted file panicked");
        }
    }
}
