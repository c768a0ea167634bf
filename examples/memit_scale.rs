//! The scale of MEMIT's λ and AlphaEdit's null-space threshold on a model:
//! the spectrum of the key statistics `C` of each layer of the MEMIT
//! window, the null-space dimension under several thresholds, and, for a
//! few CounterFact subjects, the whitened key norm `s = kᵀC⁻¹k` that
//! decides how much of its target one MEMIT layer writes (`s / (λ + s)`).
//!
//! ```sh
//! cargo run --release --example memit_scale -- [--n 20] [--stats-samples 1000]
//! ```

use std::path::PathBuf;

use kedit::edit::{EditRequest, Editor, NullSpace, NullSpaceThreshold};
use kedit::eval::read_cases;
use kedit::linalg::symmetric_eigen;
use kedit::stats::{second_moments, Corpus};

mod common;

fn main() -> std::process::ExitCode {
    common::exit_status(run())
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut n = 20usize;
    let mut samples = 1000usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let value: usize = common::parse_value(&flag, &value)?;
        if value == 0 {
            return Err(format!("{flag}: must be at least 1").into());
        }
        match flag.as_str() {
            "--n" => n = value,
            "--stats-samples" => samples = value,
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let path = kedit::fetch::ensure(&kedit::fetch::SMOLLM2_135M)?;
    let model = kedit::Model::load(path.to_str().ok_or("path")?)?;
    let corpus = Corpus::File(PathBuf::from(
        "../shared/data/prose/wikitext-2-raw-test.txt",
    ));
    let mut editor = Editor::new(model).with_corpus(corpus.clone());
    editor.hparams_mut().stats.samples = samples;
    let layers = editor.memit_hparams().layers.clone();
    let d_ff = editor.model().config().d_ff;
    let stats = second_moments(editor.model(), &layers, &corpus, &editor.hparams().stats)?;
    println!(
        "d_ff = {d_ff}, layers {layers:?}, {} corpus keys",
        stats[0].count
    );

    let cases = read_cases(std::path::Path::new(
        "../shared/data/counterfact/counterfact_preknown.json",
    ))?;
    let requests: Vec<EditRequest> = cases.iter().take(n).map(|c| c.request.clone()).collect();
    let spec = editor.memit_hparams().context_templates.clone();
    let templates = editor.templates_for(&spec)?.to_vec();
    for (layer, m) in layers.iter().zip(&stats) {
        let c = m.to_f64_vec()?;
        let (values, _) = symmetric_eigen(&c, d_ff)?;
        let q = |f: f64| values[((values.len() - 1) as f64 * f) as usize];
        println!(
            "layer {layer}: eigenvalues min {:.3e}, 10% {:.3e}, median {:.3e}, 90% {:.3e}, max {:.3e}, trace {:.3e}",
            values[0],
            q(0.1),
            q(0.5),
            q(0.9),
            values[d_ff - 1],
            values.iter().sum::<f64>()
        );
        for t in [
            NullSpaceThreshold::Absolute(1e-2),
            NullSpaceThreshold::Absolute(2e-2),
            NullSpaceThreshold::Relative(1e-4),
            NullSpaceThreshold::Relative(1e-3),
            NullSpaceThreshold::Relative(1e-2),
        ] {
            let ns = NullSpace::from_second_moment(&c, d_ff, t)?;
            println!("  {t:?}: null space of dimension {}", ns.dim());
        }
        let solver = editor.solver(*layer)?;
        let mut whitened = Vec::new();
        for req in &requests {
            let mut hp = editor.hparams().clone();
            hp.layer = *layer;
            hp.v_steps = 0;
            let kv = kedit::edit::rome::key_and_delta(editor.model(), req, &templates, &hp)?;
            let k: Vec<f64> = kv.key.to_dtype(kedit::DType::F64)?.to_vec1()?;
            let u = solver.solve(&k, 1)?;
            whitened.push(u.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>());
        }
        whitened.sort_by(f64::total_cmp);
        let mean = whitened.iter().sum::<f64>() / whitened.len() as f64;
        println!(
            "  subject keys (n = {}): kᵀC⁻¹k mean {mean:.1}, median {:.1}, min {:.1}, max {:.1}",
            whitened.len(),
            whitened[whitened.len() / 2],
            whitened[0],
            whitened[whitened.len() - 1]
        );
        for lambda in [15_000.0, 1_406.0, 100.0] {
            println!(
                "  λ = {lambda}: one layer writes s/(λ+s) = {:.3} of its share (at the mean s)",
                mean / (lambda + mean)
            );
        }
    }
    Ok(())
}
