//! The processes of a run: this one alone, or the ranks of an MPI job (`mpirun -np N attn …`,
//! `srun attn …`) when attn is built with the `mpi` feature.
//!
//! Rank 0 alone talks to the user and writes files; every rank computes. An error on any rank
//! of a job of several ends the whole job (`MPI_Abort`) with a message naming the rank, so no
//! rank waits forever for one that stopped.

use anyhow::{bail, Result};
use attn_nn::parallel::{Collective, SingleProcess};

/// This process's place in the run.
pub struct Ranks {
    single: SingleProcess,
    #[cfg(feature = "mpi")]
    mpi: Option<attn_nn::parallel::Mpi>,
}

impl Ranks {
    /// Joins the MPI job this process was started in, if any: without the `mpi` feature, a
    /// launcher that started several processes is an error (each would train the whole run
    /// and write the same files).
    pub fn join() -> Result<Ranks> {
        #[cfg(feature = "mpi")]
        {
            let mpi = attn_nn::parallel::Mpi::from_launcher()?;
            Ok(Ranks {
                single: SingleProcess,
                mpi,
            })
        }
        #[cfg(not(feature = "mpi"))]
        {
            if let Some(n @ 2..) = attn_nn::parallel::launched_processes() {
                bail!(
                    "started as one of {n} MPI processes, but this attn was built without MPI; build it with \
                     `cargo install --path crates/attn-cli --features mpi` (needs openmpi-bin, libopenmpi-dev \
                     and libclang-dev), or run one process"
                );
            }
            Ok(Ranks { single: SingleProcess })
        }
    }

    /// The transport between the ranks.
    pub fn comm(&self) -> &(dyn Collective + Sync) {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            return mpi;
        }
        &self.single
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.comm().rank()
    }

    /// How many processes share the run.
    pub fn size(&self) -> usize {
        self.comm().size()
    }

    /// Whether this process talks to the user and writes the run's files.
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// `result`, or, for a failed rank of a job of several, the message on stderr naming the
    /// rank and the end of the whole job with exit code 1.
    pub fn or_abort<T>(&self, result: Result<T>) -> Result<T> {
        #[cfg(feature = "mpi")]
        if let (Err(e), Some(mpi)) = (&result, &self.mpi) {
            if self.size() > 1 {
                eprintln!("attn: rank {} of {}: {e:#}", self.rank(), self.size());
                mpi.abort(1);
            }
        }
        result
    }

    /// This rank's share of `items` things in whole runs of `unit` (a batch the work is done
    /// in, so a rank's batches are the single process's): contiguous, in rank order, rank 0
    /// first and never empty when there is anything.
    pub fn shard(&self, items: usize, unit: usize) -> std::ops::Range<usize> {
        let (units, n) = (items.div_ceil(unit.max(1)), self.size());
        let start = |r: usize| ((r * units).div_ceil(n) * unit).min(items);
        start(self.rank())..start(self.rank() + 1)
    }

    /// Every rank's `local` bytes, in rank order, at rank 0 (`None` on the others).
    pub fn gather(&self, local: Vec<u8>) -> Option<Vec<Vec<u8>>> {
        let comm = self.comm();
        if !self.is_root() {
            comm.send_bytes(0, &local);
            return None;
        }
        let mut all = vec![local];
        all.extend((1..self.size()).map(|r| comm.receive_bytes(r)));
        Some(all)
    }

    /// Every rank's `local` values, concatenated in rank order, at rank 0 (`None` on the
    /// others); one process keeps its own without a copy.
    pub fn gather_f32(&self, local: Vec<f32>) -> Option<Vec<f32>> {
        if self.size() == 1 {
            return Some(local);
        }
        let parts = self.gather(local.iter().flat_map(|x| x.to_le_bytes()).collect())?;
        Some(
            parts
                .concat()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        )
    }

    /// Fails unless every rank holds the same `value` (a hash of what it read), naming `what`.
    pub fn check_same(&self, what: &str, value: u64) -> Result<()> {
        let (min, max) = self.comm().min_max(value);
        if min != max {
            bail!(
                "{what} differs between the {} processes (hashes {min:016x} to {max:016x}); every rank must read the same file",
                self.size()
            );
        }
        Ok(())
    }
}
