//! The name Keras gives a layer class in weight files.

/// Keras' name for a class in weight files: `MaxPooling2D` → `max_pooling2d`.
pub(super) fn snake_case(class: &str) -> String {
    let chars: Vec<char> = class.chars().collect();
    let mut out = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            let prev_lower = chars[i - 1].is_ascii_lowercase();
            if next_lower || prev_lower {
                out.push('_');
            }
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_become_keras_group_names() {
        for (class, snake) in [
            ("Dense", "dense"),
            ("Conv2D", "conv2d"),
            ("BatchNormalization", "batch_normalization"),
            ("MaxPooling2D", "max_pooling2d"),
            ("ReLU", "re_lu"),
            ("Flatten", "flatten"),
        ] {
            assert_eq!(snake_case(class), snake);
        }
    }
}
