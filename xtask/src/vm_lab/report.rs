//! The node's console lines `vmlab: PASS|FAIL|INFO|LOG ...` and the run's summary.

#[derive(Default, Debug)]
pub struct Outcome {
    pub passed: Vec<String>,
    pub failed: Vec<String>,
    pub info: Vec<String>,
    /// The suite reached its end (`vmlab: done`).
    pub done: bool,
}

impl Outcome {
    /// Takes one console line; returns the part worth showing, if any.
    pub fn feed(&mut self, raw: &str) -> Option<String> {
        let line = raw.trim_end_matches(['\r', '\n']);
        let start = line.find("vmlab: ")?;
        let body = &line[start + "vmlab: ".len()..];
        if let Some(rest) = body.strip_prefix("PASS ") {
            self.passed.push(rest.to_string());
        } else if let Some(rest) = body.strip_prefix("FAIL ") {
            self.failed.push(rest.to_string());
        } else if let Some(rest) = body.strip_prefix("INFO ") {
            self.info.push(rest.to_string());
        } else if body == "done" {
            self.done = true;
        }
        Some(body.to_string())
    }

    /// A value from an INFO line of the form `key=value ...`.
    pub fn info_value(&self, key: &str) -> Option<&str> {
        self.info.iter().find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        })
    }

    /// The closing line (`vm-lab: N passed, N failed`); an unfinished suite counts as a failure.
    pub fn summary(&self) -> String {
        let failed = self.failed.len() + usize::from(!self.done);
        format!("vm-lab: {} passed, {failed} failed", self.passed.len())
    }

    pub fn ok(&self) -> bool {
        self.done && self.failed.is_empty() && !self.passed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_pass_fail_and_reads_info() {
        let mut o = Outcome::default();
        assert_eq!(o.feed("[    3.1] random kernel line\r\n"), None);
        o.feed("vmlab: PASS ping (3 echoes)\r");
        o.feed("vmlab: FAIL ttl1-reply-stopped: delivered");
        o.feed("vmlab: INFO attach=clsact checksum=helpers kernel=6.1.0");
        assert_eq!(o.info_value("attach"), Some("clsact"));
        assert_eq!(o.info_value("checksum"), Some("helpers"));
        assert!(!o.ok());
        // Not done yet: the missing end counts as a failure.
        assert_eq!(o.summary(), "vm-lab: 1 passed, 2 failed");
        o.feed("vmlab: done");
        assert_eq!(o.summary(), "vm-lab: 1 passed, 1 failed");
        let mut good = Outcome::default();
        good.feed("vmlab: PASS ping");
        good.feed("vmlab: done");
        assert!(good.ok());
    }
}
