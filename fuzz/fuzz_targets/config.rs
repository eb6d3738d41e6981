//! The two TOML config parsers on arbitrary text: `ExperimentConfig` (meta-train experiments,
//! parsed, validated and turned into task and network descriptions) and the `train`/`finetune`
//! option file `FileConfig`. Every input must parse or fail with an `Error`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metalearn::transfer::parse_hidden;
use metalearn::transfer::config::FileConfig;
use metalearn::experiment::ExperimentConfig;
use metalearn::Network;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = ExperimentConfig::from_toml(text) {
        let _ = cfg.sinusoid();
        let _ = cfg.episode();
        let _ = cfg.task_kind();
        for input_shape in [&[1][..], &[3][..], &[1, 28, 28][..]] {
            if let Ok(arch) = cfg.architecture(input_shape) {
                let _ = Network::build(&arch);
            }
        }
        // meta-train stores the config as JSON in its checkpoints and meta-eval reads it back:
        // what validated must survive that round trip.
        let json = serde_json::to_value(&cfg).expect("a parsed config serialises");
        let reparsed: ExperimentConfig = serde_json::from_value(json.clone()).unwrap_or_else(|e| {
            panic!("a valid config fails after a JSON round trip: {e}\n{json}")
        });
        if let Err(e) = reparsed.validate() {
            panic!("a valid config is invalid after a JSON round trip: {e}\n{json}");
        }
    }
    if let Ok(cfg) = FileConfig::from_toml(text) {
        let _ = cfg.keys_set();
        for command in ["train", "finetune"] {
            let _ = cfg.check_for(command, std::path::Path::new("config.toml"));
        }
        if let Some(hidden) = &cfg.hidden {
            let _ = parse_hidden(&hidden.to_text());
        }
        if let Some(freeze) = &cfg.freeze {
            let _ = freeze.to_text();
        }
    }
});
