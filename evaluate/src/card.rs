//! The published repository's `README.md` (model card), written from the branch reports.
//!
//! It follows the familiar layout of TheBloke's GPTQ cards: a provided-files table (branch, bits,
//! group size, act order, damp %, dataset, sequence length, size) with the perplexity we measured,
//! how to download a branch, the prompt template, and which clients load which branch
//! (gptq-spec.md section 2.8: ExLlama/ExLlamaV2 load 4-bit only; current vLLM rejects act-order
//! with groups).

use std::fmt::Write;

use crate::compare::{format_group_size, format_size, BranchSummary};

/// What the card is about.
#[derive(Debug, Clone)]
pub struct CardInput {
    /// The published repository (`owner/name`).
    pub repo_id: String,
    /// The unquantized model the branches were made from (Hub id).
    pub base_model: String,
    /// The unquantized model's own results (for the perplexity reference row), if measured.
    pub baseline: Option<BranchSummary>,
    /// The branches, in table order.
    pub branches: Vec<BranchSummary>,
    /// Perplexity columns: `(text, convention)` pairs, in order.
    pub ppl_columns: Vec<(String, String)>,
}

/// One client and whether it loads a branch, with the reason when it does not.
#[derive(Debug, Clone, PartialEq)]
pub struct Support {
    /// The client.
    pub client: &'static str,
    /// Whether it loads the branch.
    pub loads: bool,
    /// Why not (empty when it loads).
    pub note: &'static str,
}

/// Which clients load a branch with these settings (gptq-spec.md section 2.8).
pub fn compatibility(bits: u32, group_size: i32, desc_act: bool) -> Vec<Support> {
    let yes = |client| Support {
        client,
        loads: true,
        note: "",
    };
    let exllama = if bits == 4 {
        yes("ExLlamaV2")
    } else {
        Support {
            client: "ExLlamaV2",
            loads: false,
            note: "ExLlama/ExLlamaV2 load 4-bit GPTQ only",
        }
    };
    let vllm = if desc_act && group_size > 0 {
        Support {
            client: "vLLM",
            loads: false,
            note: "current vLLM rejects act-order with groups (desc_act + group_size); older releases load it",
        }
    } else {
        yes("vLLM")
    };
    vec![
        yes("Transformers + optimum / GPTQModel"),
        yes("AutoGPTQ 0.6+"),
        exllama,
        vllm,
        yes("text-generation-webui (AutoGPTQ loader)"),
    ]
}

fn yes_no(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "Yes",
        Some(false) => "No",
        None => "-",
    }
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".into(), |v| v.to_string())
}

fn describe(b: &BranchSummary) -> String {
    let bits = b.bits.unwrap_or(16);
    let groups = match b.group_size {
        Some(g) if g > 0 => format!("group size {g}"),
        _ => "no group size".to_string(),
    };
    let mut d = format!(
        "{bits}-bit, {groups}, act-order {}.",
        if b.desc_act == Some(true) {
            "on"
        } else {
            "off"
        }
    );
    d.push_str(match (bits, b.group_size.unwrap_or(-1) > 0) {
        (3, false) => " Smallest; largest loss of quality.",
        (3, true) => " Groups recover part of the 3-bit loss for a little more size.",
        (4, false) => " Lowest VRAM of the 4-bit branches.",
        (4, true) => " Better accuracy than no groups, slightly larger.",
        (8, _) => " Nearly lossless; the largest branches.",
        _ => "",
    });
    d
}

/// Renders the model card.
pub fn render(input: &CardInput) -> String {
    let mut s = String::new();
    let repo_name = input.repo_id.rsplit('/').next().unwrap_or(&input.repo_id);
    let _ = writeln!(s, "---\nbase_model: {}\ninference: false\nlicense: apache-2.0\nquantized_by: mixtral-gptq\ntags:\n- gptq\n- mixtral\n---\n", input.base_model);
    let _ = writeln!(s, "# {repo_name}\n");
    let _ = writeln!(
        s,
        "GPTQ quantizations of [{0}](https://huggingface.co/{0}), one per branch, made with `mixtral-gptq` \
         (a Rust re-implementation of AutoGPTQ 0.6's GPTQ with true-sequential Mixtral order, \
         act-order and the symmetric min/max quantizer). The files are in the GPTQ \"v1\" format \
         that Transformers, AutoGPTQ, GPTQModel, vLLM and ExLlamaV2 read.\n",
        input.base_model
    );

    let _ = writeln!(s, "## Provided files and GPTQ parameters\n");
    let _ = writeln!(
        s,
        "Each branch holds one `model.safetensors` and the tokenizer and config files. `main` is the \
         default branch; the others are separate Hub branches. Perplexity is what we measured on the \
         named text and convention (lower is better); the first row is the unquantized model.\n"
    );
    let mut header =
        "| Branch | Bits | GS | Act Order | Damp % | GPTQ Dataset | Seq Len | Size |".to_string();
    for (text, conv) in &input.ppl_columns {
        let _ = write!(header, " PPL {text} ({conv}) |");
    }
    header.push_str(" ExLlama | Desc |");
    let _ = writeln!(s, "{header}");
    let _ = writeln!(
        s,
        "|{}",
        " ------ |".repeat(header.matches('|').count() - 1)
    );
    let ppl_cells = |b: &BranchSummary| -> String {
        input
            .ppl_columns
            .iter()
            .map(|(t, c)| {
                b.ppl
                    .get(&format!("{t}/{c}"))
                    .map_or(" - |".to_string(), |p| format!(" {p:.4} |"))
            })
            .collect()
    };
    if let Some(base) = &input.baseline {
        let _ = writeln!(
            s,
            "| (unquantized, bf16) | 16 | - | - | - | - | - | {} |{} - | Reference. |",
            format_size(base.size_bytes),
            ppl_cells(base)
        );
    }
    for b in &input.branches {
        let exllama = if b.bits == Some(4) { "Yes" } else { "No" };
        let _ = writeln!(
            s,
            "| [{name}](https://huggingface.co/{repo}/tree/{name}) | {bits} | {gs} | {act} | {damp} | {data} | {seq} | {size} |{ppl} {exllama} | {desc} |",
            name = b.name,
            repo = input.repo_id,
            bits = opt(&b.bits),
            gs = format_group_size(b.group_size),
            act = yes_no(b.desc_act),
            damp = opt(&b.damp_percent),
            data = opt(&b.dataset),
            seq = opt(&b.seqlen),
            size = format_size(b.size_bytes),
            ppl = ppl_cells(b),
            desc = describe(b),
        );
    }
    let _ = writeln!(
        s,
        "\n- **Bits**: bits per quantized weight.\n- **GS**: GPTQ group size; \"None\" means one group per row.\n\
         - **Act Order**: `desc_act`, quantizing columns in order of decreasing activation.\n\
         - **Damp %**: GPTQ damping as a fraction of the mean Hessian diagonal.\n\
         - **GPTQ Dataset**: the calibration data. It is not the data the model was trained on.\n\
         - **Seq Len**: length of the calibration windows.\n- **Size**: bytes of the weight files.\n"
    );

    let _ = writeln!(s, "## How to download a branch\n");
    let example = input
        .branches
        .iter()
        .find(|b| b.name != "main")
        .map_or("main", |b| b.name.as_str());
    let _ = writeln!(
        s,
        "With the Hugging Face command-line client:\n\n```shell\npip install -U \"huggingface_hub[cli]\"\n\
         hf download {repo} --revision {example} --local-dir {repo_name}\n```\n\n\
         With git:\n\n```shell\ngit clone --single-branch --branch {example} https://huggingface.co/{repo}\n```\n\n\
         In Python (Transformers with optimum/GPTQModel):\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
         model = AutoModelForCausalLM.from_pretrained(\"{repo}\", revision=\"{example}\", device_map=\"auto\")\n\
         tokenizer = AutoTokenizer.from_pretrained(\"{repo}\", revision=\"{example}\")\n```\n\n\
         Leave out `--revision`/`revision=` for `main`.\n",
        repo = input.repo_id,
    );

    let _ = writeln!(
        s,
        "## Prompt template: Mistral\n\n```\n<s>[INST] {{prompt}} [/INST]\n```\n"
    );

    let _ = writeln!(s, "## Compatibility\n");
    let clients: Vec<&str> = compatibility(4, -1, true)
        .iter()
        .map(|c| c.client)
        .collect();
    let _ = writeln!(s, "| Branch | {} |", clients.join(" | "));
    let _ = writeln!(s, "|{}", " --- |".repeat(clients.len() + 1));
    let mut notes: Vec<&str> = Vec::new();
    for b in &input.branches {
        let support = compatibility(
            b.bits.unwrap_or(16),
            b.group_size.unwrap_or(-1),
            b.desc_act.unwrap_or(false),
        );
        let cells: Vec<String> = support
            .iter()
            .map(|c| {
                if c.loads {
                    "Yes".to_string()
                } else {
                    if !notes.contains(&c.note) {
                        notes.push(c.note);
                    }
                    let n = notes.iter().position(|n| *n == c.note).unwrap_or(0) + 1;
                    format!("No ({n})")
                }
            })
            .collect();
        let _ = writeln!(s, "| `{}` | {} |", b.name, cells.join(" | "));
    }
    if !notes.is_empty() {
        let _ = writeln!(s);
        for (i, n) in notes.iter().enumerate() {
            let _ = writeln!(s, "{}. {}", i + 1, capitalize(n));
        }
    }
    let _ = writeln!(
        s,
        "\nTGI does not support Mixtral GPTQ. vLLM treats act-order without groups as no act-order, so \
         `main`-style branches load there."
    );
    s
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next().map_or(String::new(), |f| {
        f.to_uppercase().collect::<String>() + c.as_str()
    }) + "."
}

#[cfg(test)]
mod tests {
    use super::*;

    fn branch(name: &str, bits: u32, gs: i32, size: u64, ppl: f64) -> BranchSummary {
        BranchSummary {
            name: name.into(),
            bits: Some(bits),
            group_size: Some(gs),
            desc_act: Some(true),
            damp_percent: Some(0.1),
            dataset: Some("open-instruct-sample.parquet".into()),
            seqlen: Some(512),
            size_bytes: size,
            ppl: [("shakespeare/gptq-2048".to_string(), ppl)]
                .into_iter()
                .collect(),
            quant_seconds: Some(30.0),
        }
    }

    #[test]
    fn clients_per_branch_follow_the_spec() {
        let loads = |bits, gs, act, client: &str| {
            compatibility(bits, gs, act)
                .into_iter()
                .find(|c| c.client == client)
                .unwrap()
                .loads
        };
        assert!(loads(4, -1, true, "ExLlamaV2") && loads(4, 128, true, "ExLlamaV2"));
        assert!(!loads(3, -1, true, "ExLlamaV2") && !loads(8, 128, true, "ExLlamaV2"));
        assert!(loads(4, -1, true, "vLLM") && loads(3, -1, true, "vLLM"));
        assert!(
            !loads(4, 128, true, "vLLM")
                && !loads(4, 32, true, "vLLM")
                && loads(4, 128, false, "vLLM")
        );
    }

    #[test]
    fn card_table_rows_come_from_the_reports() {
        let input = CardInput {
            repo_id: "me/Mixtral-GPTQ".into(),
            base_model: "mistralai/Mixtral-8x7B-Instruct-v0.1".into(),
            baseline: None,
            branches: vec![
                branch("main", 4, -1, 39_718_384, 73.68),
                branch("gptq-3bit-128g-actorder_True", 3, 128, 38_000_000, 74.58),
            ],
            ppl_columns: vec![("shakespeare".into(), "gptq-2048".into())],
        };
        let card = render(&input);
        assert!(card.contains("| [main](https://huggingface.co/me/Mixtral-GPTQ/tree/main) | 4 | None | Yes | 0.1 | open-instruct-sample.parquet | 512 | 39.7 MB | 73.6800 | Yes |"), "{card}");
        assert!(
            card.contains("| 3 | 128 | Yes | 0.1 |") && card.contains("| 74.5800 | No |"),
            "{card}"
        );
        assert!(
            card.contains("hf download me/Mixtral-GPTQ --revision gptq-3bit-128g-actorder_True"),
            "{card}"
        );
        assert!(card.contains("[INST] {prompt} [/INST]"));
        assert!(
            card.contains("| `gptq-3bit-128g-actorder_True` | Yes | Yes | No (1) | No (2) | Yes |"),
            "{card}"
        );
        assert!(
            card.contains("1. ExLlama/ExLlamaV2 load 4-bit GPTQ only."),
            "{card}"
        );
    }
}
