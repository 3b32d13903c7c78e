//! Data-parallel training without MPI: ranks as threads that pass messages through channels
//! (`Threads`, a [`Collective`] for tests). The step's gradient must be the same bits for any
//! number of ranks, and with one micro-batch the single-process step of before.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;

use attn_core::kernels::Par;
use attn_core::{FromSafetensors, Grads, StateDict};
use attn_nn::layers::Dropout;
use attn_nn::parallel::{Collective, GradientTree, MicroBatches, SingleProcess};
use attn_nn::{Seq2Seq, Seq2SeqConfig, Step, TrainStep};
use safetensors::SafeTensors;

enum Message {
    F32(Vec<f32>),
    Bytes(Vec<u8>),
    F64(Vec<f64>),
    U64(u64),
}

/// One rank of a job of threads: `to[r]` sends to rank `r`, `from[r]` receives from it.
struct Threads {
    rank: usize,
    to: Vec<Sender<Message>>,
    from: Vec<Mutex<Receiver<Message>>>,
}

impl Threads {
    fn job(n: usize) -> Vec<Threads> {
        // channels[a][b]: from rank a to rank b.
        let mut senders: Vec<Vec<Option<Sender<Message>>>> = (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        let mut receivers: Vec<Vec<Option<Receiver<Message>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        for a in 0..n {
            for b in 0..n {
                let (s, r) = channel();
                senders[a][b] = Some(s);
                receivers[b][a] = Some(r);
            }
        }
        (0..n)
            .map(|rank| Threads {
                rank,
                to: senders[rank].iter_mut().map(|s| s.take().unwrap()).collect(),
                from: receivers[rank]
                    .iter_mut()
                    .map(|r| Mutex::new(r.take().unwrap()))
                    .collect(),
            })
            .collect()
    }

    fn get(&self, from: usize) -> Message {
        self.from[from].lock().unwrap().recv().unwrap()
    }
}

impl Collective for Threads {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.to.len()
    }

    fn send(&self, to: usize, data: &[f32]) {
        self.to[to].send(Message::F32(data.to_vec())).unwrap();
    }

    fn receive(&self, from: usize, data: &mut [f32]) {
        match self.get(from) {
            Message::F32(v) => data.copy_from_slice(&v),
            _ => panic!("rank {}: expected f32s from {from}", self.rank),
        }
    }

    fn send_bytes(&self, to: usize, data: &[u8]) {
        self.to[to].send(Message::Bytes(data.to_vec())).unwrap();
    }

    fn receive_bytes(&self, from: usize) -> Vec<u8> {
        match self.get(from) {
            Message::Bytes(v) => v,
            _ => panic!("rank {}: expected bytes from {from}", self.rank),
        }
    }

    fn broadcast(&self, root: usize, data: &mut [f32]) {
        if self.rank == root {
            (0..self.size()).filter(|&r| r != root).for_each(|r| self.send(r, data));
        } else {
            self.receive(root, data);
        }
    }

    fn sum_disjoint(&self, values: &mut [f64]) {
        for r in (0..self.size()).filter(|&r| r != self.rank) {
            self.to[r].send(Message::F64(values.to_vec())).unwrap();
        }
        let mut total = vec![0.0f64; values.len()];
        for r in 0..self.size() {
            let v = if r == self.rank {
                values.to_vec()
            } else {
                match self.get(r) {
                    Message::F64(v) => v,
                    _ => panic!("expected f64s"),
                }
            };
            total.iter_mut().zip(v).for_each(|(t, x)| *t += x);
        }
        values.copy_from_slice(&total);
    }

    fn min_max(&self, value: u64) -> (u64, u64) {
        for r in (0..self.size()).filter(|&r| r != self.rank) {
            self.to[r].send(Message::U64(value)).unwrap();
        }
        (0..self.size()).fold((value, value), |(lo, hi), r| {
            if r == self.rank {
                return (lo, hi);
            }
            match self.get(r) {
                Message::U64(v) => (lo.min(v), hi.max(v)),
                _ => panic!("expected a u64"),
            }
        })
    }
}

/// Runs `body(rank)` on `n` threads, one per rank; returns each rank's result.
fn on_ranks<T: Send>(n: usize, body: impl Fn(&Threads) -> T + Sync) -> Vec<T> {
    let job = Threads::job(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = job.iter().map(|rank| s.spawn(|| body(rank))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn model() -> Seq2Seq {
    let path = format!("{}/tests/fixtures/seq2seq/tiny.safetensors", env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let config = Seq2SeqConfig::from_json(&meta.metadata().as_ref().unwrap()["attn.seq2seq"]).unwrap();
    Seq2Seq::from_state_dict(config, StateDict::from_safetensors(&bytes).unwrap()).unwrap()
}

fn flat(g: &Grads) -> Vec<f32> {
    g.flat().unwrap().1.to_vec()
}

/// The tree alone, on values where the order of additions shows: leaf `j` puts `x_j(i)` (of
/// exponents from 2^-20 to 2^20) in every element `i`. Every rank count from 1 to K gives the
/// midpoint tree's sum, bit for bit, and it is not the left-to-right sum's.
#[test]
fn the_tree_sums_in_one_order_on_any_number_of_ranks() {
    let like = model().grads();
    let k = 7;
    let x = |j: usize, i: usize| {
        let h = (j as u64 * 0x9E37_79B9 + i as u64 * 0x85EB_CA6B) % 1_000_003;
        let e = (h % 41) as i32 - 20;
        (1.0 + (h % 997) as f32 / 997.0) * 2f32.powi(e) * if h.is_multiple_of(3) { -1.0 } else { 1.0 }
    };
    let n = flat(&like).len();
    fn tree(l: usize, r: usize, i: usize, x: &dyn Fn(usize, usize) -> f32) -> f32 {
        if r - l == 1 {
            return x(l, i);
        }
        let m = (l + r) / 2;
        tree(l, m, i, x) + tree(m, r, i, x)
    }
    let want: Vec<f32> = (0..n).map(|i| tree(0, k, i, &x)).collect();
    let left_fold: Vec<f32> = (0..n).map(|i| (1..k).fold(x(0, i), |s, j| s + x(j, i))).collect();
    assert_ne!(want, left_fold, "the values must tell the orders apart");
    for ranks in 1..=k {
        let results = on_ranks(ranks, |comm| {
            let plan = MicroBatches::new(k * 3, 3, ranks).unwrap();
            let mut out = like.clone();
            let mut tree = GradientTree::new();
            let mut computed = Vec::new();
            let values = tree
                .reduce(&plan, comm, &mut out, |j, g| {
                    computed.push(j);
                    let buf = g.flat_mut().unwrap();
                    assert!(buf.iter().all(|&v| v == 0.0), "a leaf starts from zeros");
                    buf.iter_mut().enumerate().for_each(|(i, v)| *v = x(j, i));
                    Ok(j as f64 + 0.5)
                })
                .unwrap();
            assert_eq!(computed, plan.leaves_of(comm.rank()).collect::<Vec<_>>());
            // Time in messages: none on one rank; on several, every rank takes the broadcast.
            let seconds = tree.communication_seconds();
            assert!(
                if ranks == 1 {
                    seconds == 0.0
                } else {
                    seconds > 0.0 && seconds < 60.0
                },
                "{ranks} ranks: {seconds} s of communication"
            );
            (flat(&out), values)
        });
        for (rank, (got, values)) in results.into_iter().enumerate() {
            assert!(got == want, "{ranks} ranks: rank {rank}'s sum differs from the tree's");
            assert_eq!(values, (0..k).map(|j| j as f64 + 0.5).collect::<Vec<_>>());
        }
    }
}

/// Every plan up to 40 micro-batches on 1 to K ranks: `leaves_of` splits the leaves into
/// contiguous non-empty runs in rank order, and `owner` names the rank whose run holds each
/// leaf (checked against a search over the runs).
#[test]
fn every_leaf_has_the_owner_whose_run_holds_it() {
    for k in 1..=40 {
        for ranks in 1..=k {
            let plan = MicroBatches::new(k, 1, ranks).unwrap();
            let mut next = 0;
            for r in 0..ranks {
                let run = plan.leaves_of(r);
                assert!(
                    run.start == next && run.end > run.start,
                    "K {k}, N {ranks}: rank {r} has {run:?}"
                );
                next = run.end;
                for leaf in run {
                    assert_eq!(plan.owner(leaf), r, "K {k}, N {ranks}: leaf {leaf}");
                }
            }
            assert_eq!(next, k);
        }
    }
}

/// `reduce` refuses a transport of another process count than the plan's, and gradients kept
/// by name (the tree's buffers are flat), each alone.
#[test]
fn the_tree_refuses_a_wrong_transport_or_gradients_by_name() {
    let flat_grads = model().grads();
    let plan = MicroBatches::new(4, 2, 2).unwrap();
    let err = GradientTree::new()
        .reduce(&plan, &SingleProcess, &mut flat_grads.clone(), |_, _| Ok(0.0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 processes, flat gradients: true"), "{err}");
    let one = MicroBatches::new(4, 2, 1).unwrap();
    let err = GradientTree::new()
        .reduce(&one, &SingleProcess, &mut Grads::new(), |_, _| Ok(0.0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 processes, flat gradients: false"), "{err}");
}

#[test]
fn micro_batch_plans_share_out_every_batch_and_refuse_idle_ranks() {
    let plan = MicroBatches::new(50, 8, 3).unwrap();
    assert_eq!(plan.count(), 7);
    assert_eq!(plan.pairs(6), 48..50);
    let owned: Vec<usize> = (0..7).map(|j| plan.owner(j)).collect();
    assert_eq!(owned, [0, 0, 1, 1, 2, 2, 2]);
    for r in 0..3 {
        assert!(plan.leaves_of(r).all(|j| plan.owner(j) == r));
    }
    let err = MicroBatches::new(32, 32, 2).unwrap_err().to_string();
    assert!(
        err.contains("1 micro-batch(es) of 32 pairs (a batch of 32) for 2 processes"),
        "{err}"
    );
    assert!(MicroBatches::new(0, 1, 1).is_err() && MicroBatches::new(4, 0, 1).is_err());
    // A micro-batch larger than the batch is the batch.
    assert_eq!(MicroBatches::new(5, 9, 1).unwrap().count(), 1);
}

/// A training step with dropout through `Seq2Seq::step_gradients`: 12 pairs in 5 micro-batches
/// give the same gradient bits on 1 to 5 ranks (threads) and on 1 or 2 rayon threads per rank;
/// one micro-batch gives the plain single-process step's bits.
#[test]
fn step_gradients_are_the_same_bits_on_any_number_of_ranks() {
    let model = model();
    let base = ["a b c", "b c", "c a b a", "a", "b b c a", "c c", "a c b", "b a"];
    let owned: Vec<(String, String)> = (0..12)
        .map(|i| (base[i % 8].to_string(), base[(i * 3 + 1) % 8].to_string()))
        .collect();
    let pairs: Vec<(&str, &str)> = owned.iter().map(|(s, t)| (s.as_str(), t.as_str())).collect();
    let settings = TrainStep {
        number: 3,
        dropout: 0.2,
        seed: 11,
        label_smoothing: 0.1,
        par: Par::Rayon,
    };
    let run = |ranks: usize, micro: usize, threads: usize| {
        on_ranks(ranks, |comm| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let plan = MicroBatches::new(pairs.len(), micro, ranks).unwrap();
                let mut grads = model.grads();
                let loss = model
                    .step_gradients(&pairs, &settings, (&plan, &mut GradientTree::new(), comm), &mut grads)
                    .unwrap();
                (flat(&grads), loss)
            })
        })
    };
    let (want, want_loss) = run(1, 3, 2).remove(0);
    assert!(want.iter().any(|&g| g != 0.0) && want_loss.loss.is_finite());
    for (ranks, threads) in [(2, 1), (3, 2), (4, 1), (1, 1)] {
        for (rank, (got, loss)) in run(ranks, 3, threads).into_iter().enumerate() {
            assert!(
                got == want,
                "{ranks} ranks × {threads} threads: rank {rank}'s gradient differs"
            );
            assert_eq!(loss, want_loss, "{ranks} ranks: rank {rank}'s loss");
        }
    }
    // Other micro-batches: other arithmetic (and other dropout masks), close to the same step.
    let (halves, _) = run(2, 6, 2).remove(0);
    assert!(halves != want);

    // One micro-batch: the single-process step, bit for bit.
    let (one, one_loss) = run(1, 12, 2).remove(0);
    let batch = model.packed_batch(&pairs).unwrap();
    let mut grads = model.grads();
    let mut step = Step {
        number: 3,
        ..Step::new(Dropout::for_step(0.2, 11, 3), Par::Rayon, &mut grads)
    };
    let (logits, tape) = model.forward_train(&batch, &mut step).unwrap();
    let (loss, d_logits) = model.loss(&batch, &logits, 0.1, Par::Rayon).unwrap();
    model.backward(&batch, &tape, &d_logits, &mut step).unwrap();
    assert!(flat(&grads) == one, "one micro-batch is the plain step");
    assert_eq!((one_loss.loss, one_loss.tokens), (loss, batch.target_tokens()));
    // The same through the single-process transport.
    let plan = MicroBatches::new(12, 12, 1).unwrap();
    let mut again = model.grads();
    model
        .step_gradients(
            &pairs,
            &settings,
            (&plan, &mut GradientTree::new(), &SingleProcess),
            &mut again,
        )
        .unwrap();
    assert!(flat(&again) == one);
}

/// The single-process transport: rank 0 of 1; a broadcast and a sum over ranks leave the data
/// as it is, and the minimum and maximum over ranks are the value itself. Sending or receiving
/// has no other rank to talk to, and panics (the tree never calls them with one rank).
#[test]
fn the_single_process_transport_is_rank_0_of_1() {
    let one = SingleProcess;
    assert_eq!((one.rank(), one.size()), (0, 1));
    assert_eq!(one.min_max(7), (7, 7));
    let mut data = [1.5f32, -2.0];
    one.broadcast(0, &mut data);
    assert_eq!(data, [1.5, -2.0]);
    let mut values = [0.25f64, 3.0];
    one.sum_disjoint(&mut values);
    assert_eq!(values, [0.25, 3.0]);
    let panics = |f: &dyn Fn()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err();
    assert!(panics(&|| one.send(0, &[1.0])));
    assert!(panics(&|| one.receive(0, &mut [0.0])));
    assert!(panics(&|| one.send_bytes(0, &[1])));
    assert!(panics(&|| {
        one.receive_bytes(0);
    }));
}

/// Run by `launcher_variables_say_how_many_processes` in a child process whose environment it
/// sets (setting variables here would race with the other tests' threads): `ATTN_TEST_LAUNCHER`
/// holds what the two functions must return, as `started,processes` (`-` for none).
#[test]
#[ignore = "run by launcher_variables_say_how_many_processes, in a child process"]
fn launcher_child() {
    let Ok(expected) = std::env::var("ATTN_TEST_LAUNCHER") else {
        eprintln!("launcher_child: no ATTN_TEST_LAUNCHER; launcher_variables_say_how_many_processes runs it");
        return;
    };
    let (started, processes) = expected.split_once(',').unwrap();
    assert_eq!(
        attn_nn::parallel::started_by_launcher().to_string(),
        started,
        "{expected}"
    );
    let processes = (processes != "-").then(|| processes.parse::<usize>().unwrap());
    assert_eq!(attn_nn::parallel::launched_processes(), processes, "{expected}");
}

/// OpenMPI's, PMIx's and PMI's variables say that a launcher started the process; OpenMPI's
/// and PMI's also how many processes (the larger where both are set; none where the value is
/// not a number).
#[test]
fn launcher_variables_say_how_many_processes() {
    let launcher = ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"];
    for (vars, expected) in [
        (&[][..], "false,-"),
        (&[("OMPI_COMM_WORLD_SIZE", "3")][..], "true,3"),
        (&[("PMIX_RANK", "0")][..], "true,-"),
        (&[("PMI_SIZE", "4")][..], "true,4"),
        (&[("PMI_SIZE", "4"), ("OMPI_COMM_WORLD_SIZE", "2")][..], "true,4"),
        (&[("OMPI_COMM_WORLD_SIZE", "many")][..], "true,-"),
    ] {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child.args(["--ignored", "--exact", "launcher_child", "--test-threads=1"]);
        for name in launcher {
            child.env_remove(name);
        }
        child.envs(vars.iter().copied()).env("ATTN_TEST_LAUNCHER", expected);
        let out = child.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{vars:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
