//! Pre-trained image backbones: their architectures (EfficientNet-Lite), their weights as people
//! have them (safetensors, PyTorch `.pth` read without running code) and the image
//! preprocessing they were trained with.

pub mod backbone;
pub mod efficientnet;
pub mod features;
pub mod image;
pub mod pth;

pub use backbone::{Backbone, Preprocess};
pub use efficientnet::EfficientNetLite;
