//! The topic tree of docs/mqtt.md: `R = <prefix>/<site>/<cell>/<controller_id>`.

/// The default topic prefix (the `v1` is the contract's version).
pub const PREFIX: &str = "bf/v1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    root: String,
}

impl Topics {
    pub fn new(prefix: &str, site: &str, cell: &str, controller: &str) -> Topics {
        Topics {
            root: format!("{prefix}/{site}/{cell}/{controller}"),
        }
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn state(&self) -> String {
        format!("{}/$state", self.root)
    }

    pub fn description(&self) -> String {
        format!("{}/$description", self.root)
    }

    pub fn device_state(&self, device: &str) -> String {
        format!("{}/device/{device}/$state", self.root)
    }

    pub fn device_fault(&self, device: &str) -> String {
        format!("{}/device/{device}/$fault", self.root)
    }

    pub fn telemetry(&self, device: &str) -> String {
        format!("{}/device/{device}/telemetry", self.root)
    }

    pub fn run_state(&self, run_id: &str) -> String {
        format!("{}/run/{run_id}/$state", self.root)
    }

    pub fn run_event(&self, run_id: &str) -> String {
        format!("{}/run/{run_id}/event", self.root)
    }

    pub fn run_current(&self) -> String {
        format!("{}/run/current", self.root)
    }

    pub fn alarm(&self, alarm_id: &str) -> String {
        format!("{}/alarm/{alarm_id}", self.root)
    }

    /// What the controller subscribes to.
    pub fn commands(&self) -> String {
        format!("{}/cmd/+", self.root)
    }

    pub fn cmd_result(&self, cmd_id: &str) -> String {
        format!("{}/cmd_result/{cmd_id}", self.root)
    }

    /// The verb of a command topic (`R/cmd/<verb>`), or None for any other topic.
    pub fn command_verb<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let rest = topic.strip_prefix(self.root.as_str())?;
        let verb = rest.strip_prefix("/cmd/")?;
        (!verb.contains('/')).then_some(verb)
    }
}

/// True when `s` can be one level of a topic the controller publishes on
/// (site, cell, controller and device ids).
pub fn is_topic_level(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_the_contract() {
        let t = Topics::new(PREFIX, "site1", "cell-a", "ctl-1");
        assert_eq!(t.state(), "bf/v1/site1/cell-a/ctl-1/$state");
        assert_eq!(
            t.telemetry("br1"),
            "bf/v1/site1/cell-a/ctl-1/device/br1/telemetry"
        );
        assert_eq!(t.run_event("r1"), "bf/v1/site1/cell-a/ctl-1/run/r1/event");
        assert_eq!(t.commands(), "bf/v1/site1/cell-a/ctl-1/cmd/+");
        assert_eq!(
            t.command_verb("bf/v1/site1/cell-a/ctl-1/cmd/pause"),
            Some("pause")
        );
        assert_eq!(t.command_verb("bf/v1/site1/cell-a/ctl-1/cmd/a/b"), None);
        assert_eq!(t.command_verb("bf/v1/other/cell-a/ctl-1/cmd/pause"), None);
        assert!(is_topic_level("br-1.a"));
        assert!(!is_topic_level("a/b") && !is_topic_level("+") && !is_topic_level(""));
    }
}
