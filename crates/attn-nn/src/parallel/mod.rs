//! Data-parallel training with the same bytes on any number of processes.
//!
//! A step's batch is cut into `K` fixed micro-batches (`micro_batch` pairs each, the last
//! possibly shorter), whatever the number of processes. Micro-batch `j`'s gradient `g_j` is
//! computed whole, by one process, exactly as a single process computes it (attn's backward
//! gives the same bits on any thread count), and the step's gradient is their sum in one fixed
//! tree: `sum(l..r) = sum(l..m) + sum(m..r)` with `m = (l + r) / 2`, leaves in batch order.
//! Floating-point addition is not associative, so the tree *is* the arithmetic; fixing it fixes
//! the bits.
//!
//! Ranks own contiguous runs of micro-batches (rank `r` the leaves from `r·K/N` up to
//! `(r+1)·K/N`). Each tree node is evaluated by the rank that owns its first leaf:
//! 1. every rank sums, locally and in tree order, the largest nodes that lie wholly in its run;
//! 2. the nodes that span ranks are then evaluated children first: the owner of a node's first
//!    leaf adds the right child, received from the owner of that child's first leaf when it
//!    is another rank (point-to-point, in the same post-order on every rank, so the messages
//!    of a pair of ranks match in order and none waits on a later one);
//! 3. rank 0 then holds the root and broadcasts it: a copy, no arithmetic.
//!
//! Every addition of the single-process tree happens once, with the same operands, on some
//! rank: the result is bit for bit the single-process one for *any* number of ranks up to `K`
//! (1, 2, 3, 4, …), and on any thread count per rank. When `N` is a power of two dividing `K`,
//! step 2 is a binomial reduction (`log2 N` rounds of one buffer); otherwise a boundary between
//! ranks that cuts a node sends up to `log2 K` buffers.
//!
//! Unlike a library all-reduce (whose order of additions changes with the world size, the
//! algorithm and the message size), nothing here is summed in an order the transport picks.
//! With `K = 1` the tree is one leaf computed straight into the output: the single-process
//! step of before, bit for bit.
//!
//! [`Collective`] is the transport: [`SingleProcess`] here, `Mpi` (the `mpi` feature) over MPI.

#[cfg(feature = "mpi")]
mod mpi;

#[cfg(feature = "mpi")]
pub use self::mpi::Mpi;

use std::ops::Range;

use attn_core::{flat_zip_mut, Grads};

use crate::error::invalid;
use crate::Result;

/// Environment variables an MPI launcher sets in the processes it starts: OpenMPI's `mpirun`,
/// PMIx (`srun --mpi=pmix`), PMI/PMI2 (MPICH's Hydra, `srun --mpi=pmi2`).
const LAUNCHER_VARS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"];

/// Whether an MPI launcher started this process (whatever this build can do about it).
pub fn started_by_launcher() -> bool {
    LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some())
}

/// The number of processes an MPI launcher says it started, where it says (OpenMPI, PMI).
pub fn launched_processes() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .filter_map(|v| std::env::var(v).ok()?.parse().ok())
        .max()
}

/// What the gradient tree needs from a transport between processes: point-to-point messages of
/// `f32`s between ranks, a broadcast, and an exact all-reduce of a few `f64`s and `u64`s.
///
/// Every method is collective in the MPI sense where it says so: every rank calls it, in the
/// same order. Transports abort the job on a communication failure (MPI's default), so the
/// methods do not return errors.
pub trait Collective {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// How many processes.
    fn size(&self) -> usize;
    /// Sends `data` to rank `to` (which calls [`receive`](Self::receive) with this rank).
    fn send(&self, to: usize, data: &[f32]);
    /// Receives from rank `from` into `data` (its length is the message's).
    fn receive(&self, from: usize, data: &mut [f32]);
    /// Sends `data` to rank `to` (which calls [`receive_bytes`](Self::receive_bytes)).
    fn send_bytes(&self, to: usize, data: &[u8]);
    /// Receives a message of any length from rank `from`.
    fn receive_bytes(&self, from: usize) -> Vec<u8>;
    /// Collective: rank `root`'s `data` into every rank's `data`.
    fn broadcast(&self, root: usize, data: &mut [f32]);
    /// Collective: every rank's `values`, summed elementwise, into every rank's `values`. Used
    /// with values of which each position is non-zero on at most one rank, so the sum is exact
    /// in any order.
    fn sum_disjoint(&self, values: &mut [f64]);
    /// Collective: the smallest and the largest of every rank's `value`.
    fn min_max(&self, value: u64) -> (u64, u64);
}

/// One process: rank 0 of 1. Nothing is sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn send(&self, _: usize, _: &[f32]) {
        unreachable!("a single process has no other rank to send to")
    }

    fn receive(&self, _: usize, _: &mut [f32]) {
        unreachable!("a single process has no other rank to receive from")
    }

    fn send_bytes(&self, _: usize, _: &[u8]) {
        unreachable!("a single process has no other rank to send to")
    }

    fn receive_bytes(&self, _: usize) -> Vec<u8> {
        unreachable!("a single process has no other rank to receive from")
    }

    fn broadcast(&self, _: usize, _: &mut [f32]) {}

    fn sum_disjoint(&self, _: &mut [f64]) {}

    fn min_max(&self, value: u64) -> (u64, u64) {
        (value, value)
    }
}

/// The micro-batches of a step and the ranks that own them: see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MicroBatches {
    /// Pairs in the step's batch.
    pub batch: usize,
    /// Pairs per micro-batch (the last may have fewer).
    pub micro_batch: usize,
    /// Processes sharing the step.
    pub ranks: usize,
}

impl MicroBatches {
    /// `batch` pairs in micro-batches of `micro_batch` over `ranks` processes; every rank must
    /// own at least one micro-batch.
    pub fn new(batch: usize, micro_batch: usize, ranks: usize) -> Result<Self> {
        if batch == 0 || micro_batch == 0 || ranks == 0 {
            return Err(invalid(
                "MicroBatches",
                format!("batch {batch}, micro-batch {micro_batch}, ranks {ranks}"),
                "all at least 1",
            ));
        }
        let plan = MicroBatches {
            batch,
            micro_batch: micro_batch.min(batch),
            ranks,
        };
        if plan.count() < ranks {
            return Err(invalid(
                "MicroBatches",
                format!(
                    "{} micro-batch(es) of {} pairs (a batch of {batch}) for {ranks} processes",
                    plan.count(),
                    plan.micro_batch
                ),
                "at least one micro-batch per process: a smaller micro-batch (it changes the arithmetic, \
                 so a run gives the same bytes as the runs with the same micro-batch, on any number of processes)",
            ));
        }
        Ok(plan)
    }

    /// `K`, the number of micro-batches.
    pub fn count(&self) -> usize {
        self.batch.div_ceil(self.micro_batch)
    }

    /// The pairs of micro-batch `j`, as indices into the step's batch.
    pub fn pairs(&self, j: usize) -> Range<usize> {
        j * self.micro_batch..((j + 1) * self.micro_batch).min(self.batch)
    }

    /// The micro-batches rank `rank` computes.
    pub fn leaves_of(&self, rank: usize) -> Range<usize> {
        let k = self.count();
        rank * k / self.ranks..(rank + 1) * k / self.ranks
    }

    /// The rank that computes micro-batch `leaf`.
    pub fn owner(&self, leaf: usize) -> usize {
        // The largest r with r·K/N <= leaf.
        let k = self.count();
        let mut r = (leaf * self.ranks) / k;
        while r + 1 < self.ranks && (r + 1) * k / self.ranks <= leaf {
            r += 1;
        }
        while r > 0 && r * k / self.ranks > leaf {
            r -= 1;
        }
        r
    }
}

/// A node of the summation tree: the micro-batches `l..r`.
type Node = (usize, usize);

fn children((l, r): Node) -> (Node, Node) {
    let m = (l + r) / 2;
    ((l, m), (m, r))
}

/// Spare gradient buffers for the tree's partial sums, kept from step to step so a step
/// allocates nothing once the tree has run once.
#[derive(Debug, Default)]
pub struct GradientTree {
    spare: Vec<Grads>,
    /// Seconds the last [`reduce`](Self::reduce) spent in `comm`'s calls.
    communication_s: f64,
}

/// The result of [`GradientTree::reduce`]: each micro-batch's value (its loss), in batch order,
/// on every rank.
pub type LeafValues = Vec<f64>;

impl GradientTree {
    /// An empty pool.
    pub fn new() -> Self {
        GradientTree::default()
    }

    /// Seconds the last [`reduce`](Self::reduce) spent in the transport's calls: sending,
    /// receiving (waiting for the sender included) and the broadcast.
    pub fn communication_seconds(&self) -> f64 {
        self.communication_s
    }

    fn take(&mut self, like: &Grads) -> Result<Grads> {
        let mut g = match self.spare.pop() {
            Some(g) => g,
            None => zeros_like(like)?,
        };
        g.zero();
        Ok(g)
    }

    /// The step's gradient, `Σ_j g_j` in the fixed tree, into `out` on every rank; `leaf(j,
    /// grads)` adds micro-batch `j`'s gradient into the zeroed `grads` and returns its value
    /// (its share of the loss), which comes back for every `j` on every rank.
    ///
    /// `out` must be flat gradients ([`Grads::for_store`]); every rank calls this with the same
    /// `plan` (and `comm.size() == plan.ranks`). An error from `leaf` returns on its rank while
    /// the others wait for its messages: a program of several ranks ends the job on an error
    /// (`Mpi::abort`, as attn's CLI does), since no rank can go on alone.
    pub fn reduce(
        &mut self,
        plan: &MicroBatches,
        comm: &dyn Collective,
        out: &mut Grads,
        mut leaf: impl FnMut(usize, &mut Grads) -> Result<f64>,
    ) -> Result<LeafValues> {
        if comm.size() != plan.ranks || out.flat().is_none() {
            return Err(invalid(
                "GradientTree::reduce",
                format!("{} processes, flat gradients: {}", comm.size(), out.flat().is_some()),
                "the plan's process count and flat gradients (Grads::for_store)",
            ));
        }
        let me = comm.rank();
        let k = plan.count();
        self.communication_s = 0.0;
        let timed = |total: &mut f64, f: &mut dyn FnMut()| {
            let t0 = std::time::Instant::now();
            f();
            *total += t0.elapsed().as_secs_f64();
        };
        let mut values = vec![0.0f64; k];
        let root = (0, k);
        // 1. The largest nodes wholly in this rank's run, summed locally; the root straight
        //    into `out` when it is one of them (one process).
        let mut held: Vec<(Node, Grads)> = Vec::new();
        let mut local = Vec::new();
        maximal_local_nodes(plan, root, me, &mut local);
        for node in local {
            if node == root {
                out.zero();
                self.evaluate(node, out, &mut leaf, &mut values)?;
            } else {
                let mut g = self.take(out)?;
                self.evaluate(node, &mut g, &mut leaf, &mut values)?;
                held.push((node, g));
            }
        }
        // 2. The nodes spanning ranks, children first.
        if plan.ranks > 1 {
            let mut cross = Vec::new();
            cross_nodes_post_order(plan, root, &mut cross);
            for node in cross {
                let (left, right) = children(node);
                let (at, from) = (plan.owner(left.0), plan.owner(right.0));
                if me == at {
                    let mut sum = take_node(&mut held, left);
                    let right_sum = if from == me {
                        take_node(&mut held, right)
                    } else {
                        let mut g = self.take(out)?;
                        timed(&mut self.communication_s, &mut || comm.receive(from, flat_mut(&mut g)));
                        g
                    };
                    add_into(&mut sum, &right_sum);
                    self.spare.push(right_sum);
                    held.push((node, sum));
                } else if me == from {
                    let g = take_node(&mut held, right);
                    timed(&mut self.communication_s, &mut || comm.send(at, flat(&g)));
                    self.spare.push(g);
                }
            }
            // 3. Rank 0 holds the root: everyone gets a copy.
            if me == 0 {
                let sum = take_node(&mut held, root);
                flat_mut(out).copy_from_slice(flat(&sum));
                self.spare.push(sum);
            }
            timed(&mut self.communication_s, &mut || {
                comm.broadcast(0, flat_mut(out));
                comm.sum_disjoint(&mut values);
            });
        }
        debug_assert!(held.is_empty(), "every partial sum was used");
        Ok(values)
    }

    /// Sums the leaves of `node` into `dst` (zeroed) in tree order.
    fn evaluate(
        &mut self,
        (l, r): Node,
        dst: &mut Grads,
        leaf: &mut impl FnMut(usize, &mut Grads) -> Result<f64>,
        values: &mut [f64],
    ) -> Result<()> {
        if r - l == 1 {
            values[l] = leaf(l, dst)?;
            return Ok(());
        }
        let (left, right) = children((l, r));
        self.evaluate(left, dst, leaf, values)?;
        let mut g = self.take(dst)?;
        let result = self.evaluate(right, &mut g, leaf, values);
        if result.is_ok() {
            add_into(dst, &g);
        }
        self.spare.push(g);
        result
    }
}

/// The nodes under `node` that lie wholly in `rank`'s run and whose parent does not, in
/// depth-first order.
fn maximal_local_nodes(plan: &MicroBatches, node: Node, rank: usize, out: &mut Vec<Node>) {
    let (first, last) = (plan.owner(node.0), plan.owner(node.1 - 1));
    if first == last {
        if first == rank {
            out.push(node);
        }
        return;
    }
    let (left, right) = children(node);
    maximal_local_nodes(plan, left, rank, out);
    maximal_local_nodes(plan, right, rank, out);
}

/// The nodes under `node` whose leaves belong to more than one rank, children before parents.
fn cross_nodes_post_order(plan: &MicroBatches, node: Node, out: &mut Vec<Node>) {
    if plan.owner(node.0) == plan.owner(node.1 - 1) {
        return;
    }
    let (left, right) = children(node);
    cross_nodes_post_order(plan, left, out);
    cross_nodes_post_order(plan, right, out);
    out.push(node);
}

fn take_node(held: &mut Vec<(Node, Grads)>, node: Node) -> Grads {
    let i = held
        .iter()
        .position(|(n, _)| *n == node)
        .expect("a child is evaluated before its parent, on the rank that owns its first leaf");
    held.swap_remove(i).1
}

/// A buffer of `like`'s store and layout (made once; the pool keeps it).
fn zeros_like(like: &Grads) -> Result<Grads> {
    if like.flat().is_none() {
        return Err(invalid(
            "GradientTree",
            "gradients by name",
            "flat gradients (Grads::for_store)",
        ));
    }
    let mut g = like.clone();
    g.zero();
    Ok(g)
}

fn flat(g: &Grads) -> &[f32] {
    g.flat().map(|(_, f)| f).expect("the tree's buffers are flat")
}

fn flat_mut(g: &mut Grads) -> &mut [f32] {
    g.flat_mut().expect("the tree's buffers are flat")
}

/// `dst += src`, elementwise (the same bits on any thread count).
fn add_into(dst: &mut Grads, src: &Grads) {
    flat_zip_mut(flat_mut(dst), flat(src), |a, b| {
        a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    });
}
