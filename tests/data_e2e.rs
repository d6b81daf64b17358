//! Every shared data set loads in its natural format and trains a few steps on stories260K.

mod common;

use lorafit::config::{Config, DataFormat};
use lorafit::train::run::{run, RunOptions};

struct Case {
    path: &'static str,
    format: DataFormat,
    columns: &'static [(&'static str, &'static str)],
}

const CASES: &[Case] = &[
    Case { path: "alpaca/alpaca_tiny_torchtune.json", format: DataFormat::Alpaca, columns: &[] },
    Case { path: "alpaca/identity_llamafactory.json", format: DataFormat::Alpaca, columns: &[] },
    // Dolly's prompts are already rendered with the Alpaca template (see the prompt template
    // override below).
    Case {
        path: "dolly/dolly_prompt_answer_151.jsonl",
        format: DataFormat::Alpaca,
        columns: &[("instruction", "prompt"), ("output", "answer")],
    },
    Case { path: "sharegpt/dummy_conversation_fastchat.json", format: DataFormat::Chat, columns: &[] },
    Case { path: "sharegpt/chat_tiny_torchtune.json", format: DataFormat::Chat, columns: &[] },
    Case { path: "sharegpt/v1_sft_demo_llamafactory.jsonl", format: DataFormat::Chat, columns: &[] },
    Case { path: "sharegpt/c4_demo_llamafactory.jsonl", format: DataFormat::Completion, columns: &[] },
    Case { path: "tinyshakespeare/input.txt", format: DataFormat::Completion, columns: &[] },
    Case { path: "hf-arrow-parquet/alpaca_tiny_save_to_disk", format: DataFormat::Alpaca, columns: &[] },
    Case { path: "hf-arrow-parquet/sharegpt_dummy_save_to_disk", format: DataFormat::Chat, columns: &[] },
    Case {
        path: "hf-arrow-parquet/alpaca_tiny_parquet/data/*.parquet",
        format: DataFormat::Alpaca,
        columns: &[],
    },
    Case {
        path: "hf-arrow-parquet/sharegpt_dummy_parquet/data/*.parquet",
        format: DataFormat::Chat,
        columns: &[],
    },
    Case { path: "hf-arrow-parquet/alpaca_tiny.ipc_file.arrow", format: DataFormat::Alpaca, columns: &[] },
];

#[test]
fn every_shared_data_set_trains_a_few_steps() {
    let Some(assets) = common::assets() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for (i, case) in CASES.iter().enumerate() {
        let mut cfg = Config::new(common::stories260k(&assets), assets.join("datasets").join(case.path));
        cfg.data.format = case.format;
        cfg.data.columns = case.columns.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        if case.path.starts_with("dolly") {
            cfg.data.prompt_template_no_input = Some("{instruction}".into());
        }
        cfg.data.chat_template = "chatml".into();
        cfg.data.max_seq_len = 128;
        cfg.train.max_steps = Some(2);
        cfg.train.micro_batch_size = 2;
        cfg.output.dir = tmp.path().to_path_buf();
        cfg.output.run_name = Some(format!("case-{i}"));
        let summary = run(&cfg, &RunOptions::default()).unwrap_or_else(|e| panic!("{}: {e:#}", case.path));
        assert_eq!(summary.steps, 2, "{}", case.path);
        assert!(summary.first_loss.is_finite() && summary.last_loss.is_finite(), "{}", case.path);
        assert!(summary.adapter_dir.join("adapter_model.safetensors").exists());
    }
}
