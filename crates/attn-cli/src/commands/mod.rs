//! One module per subcommand: its flags (`Args`) and its `main`, over [`crate::support`].
//! A subcommand's private parts live beside it (`demo_dates` is the demo's).

pub mod attend;
pub mod bench;
pub mod check;
pub mod dates;
pub mod demo;
pub mod demo_dates;
pub mod embed;
pub mod run;
pub mod sdpa;
pub mod sweep;
pub mod train;
pub mod translate;
