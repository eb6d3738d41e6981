//! Text classification on a pre-trained sentence encoder: the model and its self-contained
//! checkpoint ([`model`]), the transfer methods ([`train`]), and scores with out-of-scope
//! detection ([`score`]).

pub mod model;
pub mod run;
pub mod score;
pub mod train;

pub use crate::text::{TextSection, UnknownRule, HEAD, TEXT_SECTION};
pub use model::{TextClassifier, TextPrediction};
pub use run::{train_text_and_save, TextRunReport, TextRunSettings};
pub use score::{choose_threshold, score_texts, TextScores};
pub use train::{train_text_classifier, TextMethod, TextTrainPlan, TextTrainReport, TextTrainer};
