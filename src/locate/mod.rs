//! Locate: causal tracing of where a model keeps a fact.
//!
//! For a prompt whose answer the model knows, [`trace`] (1) runs the clean
//! prompt and records every site; (2) adds seeded Gaussian noise of scale ν
//! (default 3 × the standard deviation of the embedding matrix's entries) to
//! the subject's token embeddings; (3) for every (token, layer) restores the
//! clean value of one site — the residual stream, or a window of consecutive
//! MLP or attention outputs — in the corrupted run and records P(answer),
//! averaged over several noise samples. The indirect effect of a site is
//! P(restored) − P(corrupted).
//!
//! Restored runs are batched (many restorations per forward pass, each a
//! batch row) and start at the lowest restored layer from the corrupted
//! run's residual stream, since the layers below are unchanged.
//!
//! [`TraceResult`] holds the grids (tokens × layers per kind), serialises to
//! JSON and CSV and draws heatmaps as SVG and PNG (with a built-in bitmap
//! font). [`aggregate`] averages the effects over many facts at six token
//! positions ([`Position`]) and [`Aggregate::recommend_layers`] picks the
//! layer(s) to edit from the MLP effect at the subject's last token.

mod aggregate;
mod font;
pub mod plot;
mod result;
mod trace;

pub use aggregate::{
    aggregate, facts_known_by, load_known_facts, recommend_layers, Aggregate, Fact, KnownFact,
    LayerScope, Position,
};
pub use plot::Figure;
pub use result::{Grid, TraceResult};
pub use trace::{
    embedding_std, trace, window_layers, Kind, NoiseScale, Strategy, TraceOptions, Tracer,
};
