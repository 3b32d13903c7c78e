//! [`Collective`] over MPI (rsmpi, OpenMPI from the distribution's packages): the world
//! communicator of a job started by `mpirun` or `srun`.

use mpi::collective::SystemOperation;
use mpi::environment::{Threading, Universe};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::sync::Mutex;

use super::Collective;

/// The MPI job this process is a rank of.
pub struct Mpi {
    world: Mutex<World>,
    rank: usize,
    size: usize,
    // Finalises MPI when dropped; declared last so the communicator goes first.
    _universe: Universe,
}

/// The world communicator, used under `Mpi`'s lock only.
struct World(SimpleCommunicator);

// SAFETY: MPI was initialised with MPI_THREAD_SERIALIZED or more (checked in `from_launcher`),
// which allows calls from any thread as long as no two are concurrent; `Mpi` makes every call
// under its mutex.
unsafe impl Send for World {}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mpi {{ rank: {}, size: {} }}", self.rank, self.size)
    }
}

impl Mpi {
    /// Joins the job when this process was started by an MPI launcher; `Ok(None)` when it was
    /// not (then nothing of MPI is touched, and a program runs as one process) or when MPI was
    /// already initialised. MPI is asked for `MPI_THREAD_SERIALIZED`: the calls come from
    /// whichever thread runs the training loop (a rayon pool's), one at a time; a library that
    /// offers less is an error.
    pub fn from_launcher() -> crate::Result<Option<Mpi>> {
        if !super::started_by_launcher() {
            return Ok(None);
        }
        let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Serialized) else {
            return Ok(None);
        };
        if threading < Threading::Serialized {
            return Err(crate::error::invalid(
                "MPI thread support",
                format!("{threading:?}"),
                "Serialized or Multiple (MPI_Init_thread)",
            ));
        }
        let world = universe.world();
        Ok(Some(Mpi {
            rank: world.rank() as usize,
            size: world.size() as usize,
            world: Mutex::new(World(world)),
            _universe: universe,
        }))
    }

    /// Ends every process of the job with `code` (`MPI_Abort`): what a rank does when it
    /// cannot go on, so that the others do not wait for it forever.
    pub fn abort(&self, code: i32) -> ! {
        self.with(|w| w.abort(code))
    }

    /// Collective: waits for every rank.
    pub fn barrier(&self) {
        self.with(|w| w.barrier());
    }

    /// Runs `f` on the communicator, one call at a time.
    fn with<T>(&self, f: impl FnOnce(&SimpleCommunicator) -> T) -> T {
        // A poisoned lock only means another call panicked; the communicator is still valid.
        let world = self.world.lock().unwrap_or_else(|e| e.into_inner());
        f(&world.0)
    }
}

fn rank_of(r: usize) -> i32 {
    i32::try_from(r).expect("an MPI rank fits an i32")
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn send(&self, to: usize, data: &[f32]) {
        self.with(|w| w.process_at_rank(rank_of(to)).send(data));
    }

    fn receive(&self, from: usize, data: &mut [f32]) {
        let status = self.with(|w| w.process_at_rank(rank_of(from)).receive_into(data));
        debug_assert_eq!(status.count(f32::equivalent_datatype()) as usize, data.len());
    }

    fn send_bytes(&self, to: usize, data: &[u8]) {
        self.with(|w| w.process_at_rank(rank_of(to)).send(data));
    }

    fn receive_bytes(&self, from: usize) -> Vec<u8> {
        self.with(|w| w.process_at_rank(rank_of(from)).receive_vec::<u8>().0)
    }

    fn broadcast(&self, root: usize, data: &mut [f32]) {
        self.with(|w| w.process_at_rank(rank_of(root)).broadcast_into(data));
    }

    fn sum_disjoint(&self, values: &mut [f64]) {
        let local = values.to_vec();
        self.with(|w| w.all_reduce_into(&local[..], values, SystemOperation::sum()));
    }

    fn min_max(&self, value: u64) -> (u64, u64) {
        let (mut min, mut max) = (0u64, 0u64);
        self.with(|w| {
            w.all_reduce_into(&value, &mut min, SystemOperation::min());
            w.all_reduce_into(&value, &mut max, SystemOperation::max());
        });
        (min, max)
    }
}
