//! "Did you mean ...?": the nearest valid name to a misspelt one, shared by every config format
//! and by the CSV column look-up, so that all of them suggest with one edit distance.

/// Edit distance between two strings, counted in characters: insertions, deletions,
/// substitutions and swaps of two neighbours (`adma` is one edit from `adam`) each cost 1.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // d[i][j]: distance between the first i characters of a and the first j of b.
    let mut d = vec![vec![0; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    d[0] = (0..=b.len()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// The candidate `word` was most likely meant to be: the nearest by edit distance (ignoring case,
/// and `-` versus `_`) within a third of the longer name, else one that contains `word` or is
/// contained in it, else one made of the initials of `word`'s parts; `None` when nothing is
/// close.
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let normal = |s: &str| s.to_ascii_lowercase().replace('-', "_");
    let word = normal(word);
    let near = candidates
        .iter()
        .map(|&c| (edit_distance(&word, &normal(c)), c))
        .filter(|(d, c)| *d <= (word.len().max(c.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c);
    let containing = || {
        candidates.iter().copied().find(|c| {
            let c = normal(c);
            word.len() >= 3 && c.len() >= 3 && (c.contains(&word) || word.contains(&c))
        })
    };
    // `learning_rate` for `lr`: the initials of the word's parts.
    let initials: String = word
        .split('_')
        .filter_map(|part| part.chars().next())
        .collect();
    let abbreviated = || {
        candidates
            .iter()
            .copied()
            .find(|c| initials.len() >= 2 && normal(c) == initials)
    };
    near.or_else(containing).or_else(abbreviated)
}

/// `" (did you mean \"x\"?)"` for a misspelt value, or nothing.
pub fn did_you_mean(word: &str, candidates: &[&str]) -> String {
    closest(word, candidates)
        .map(|c| format!(" (did you mean \"{c}\"?)"))
        .unwrap_or_default()
}

/// The entry of `table` named `name`, or an error naming what was asked (`what`, e.g. "text
/// method"), with a "did you mean" and the valid names; `hint` is added after the name.
pub fn lookup_named<T: Copy>(
    name: &str,
    table: &[(&str, T)],
    what: &str,
    hint: &str,
) -> crate::error::Result<T> {
    if let Some((_, value)) = table.iter().find(|(n, _)| *n == name) {
        return Ok(*value);
    }
    let names: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
    Err(crate::error::Error::Config(format!(
        "unknown {what} `{name}`{hint}{}; choose one of: {}",
        did_you_mean(name, &names),
        names.join(", ")
    )))
}

/// The name of `value` in `table`.
pub fn name_of<T: PartialEq>(value: &T, table: &[(&'static str, T)]) -> &'static str {
    table
        .iter()
        .find(|(_, v)| v == value)
        .map(|(n, _)| *n)
        .expect("every value is listed in its table")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("label", "label"), 0);
        assert_eq!(edit_distance("labl", "label"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("adma", "adam"), 1);
    }

    #[test]
    fn closest_suggests_only_near_names() {
        let cols = ["sepal_length", "species", "petal_width"];
        assert_eq!(closest("Specie", &cols), Some("species"));
        assert_eq!(closest("SPECIES", &cols), Some("species"));
        assert_eq!(closest("xyz", &cols), None);
    }
}
