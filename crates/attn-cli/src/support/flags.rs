//! Value parsers shared by the commands' flags, so that a value out of range is a usage error
//! (exit 2, with clap's message naming the flag) rather than a runtime error after work began.

/// A count that must be at least 1 (`--beam`, `--max-len`, `--steps`, `--batch`, ...).
pub fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("0 is too small; expected at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{text}` is not a whole number; expected at least 1")),
    }
}

/// [`at_least_one`] as a `u64`.
pub fn at_least_one_u64(text: &str) -> Result<u64, String> {
    at_least_one(text).map(|n| n as u64)
}

/// A picture's path: `.png` or `.html`, checked when the flags are read, before any work.
pub fn png_or_html(text: &str) -> Result<std::path::PathBuf, String> {
    picture(text, &["png", "html"])
}

/// A path ending in `.png`.
pub fn png(text: &str) -> Result<std::path::PathBuf, String> {
    picture(text, &["png"])
}

/// A path ending in `.html`.
pub fn html(text: &str) -> Result<std::path::PathBuf, String> {
    picture(text, &["html"])
}

fn picture(text: &str, extensions: &[&str]) -> Result<std::path::PathBuf, String> {
    let path = std::path::PathBuf::from(text);
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if extensions.contains(&extension.as_str()) {
        Ok(path)
    } else {
        let expected: Vec<String> = extensions.iter().map(|e| format!(".{e}")).collect();
        Err(format!("`{text}`: expected a {} file", expected.join(" or ")))
    }
}

/// `1,234,567`: a count as a person reads it in a message.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        assert_eq!(at_least_one("3"), Ok(3));
        assert!(at_least_one("0").unwrap_err().contains("at least 1"));
        assert!(at_least_one("-1").unwrap_err().contains("`-1`"));
        assert_eq!(thousands(7), "7");
        assert_eq!(thousands(10_001), "10,001");
        assert_eq!(thousands(1_234_567), "1,234,567");
        // A count of whole groups of three digits takes no leading comma.
        assert_eq!(thousands(942), "942");
        assert_eq!(thousands(942_992), "942,992");
        assert!(png_or_html("a/b.HTML").is_ok() && png_or_html("x.png").is_ok());
        assert!(png_or_html("x.svg").unwrap_err().contains(".png or .html"));
        assert!(png("x.jpg").unwrap_err().contains("expected a .png file"));
        assert!(html("x").is_err());
    }
}
