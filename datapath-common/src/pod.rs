//! Registered pods: the `PODS` map value.

/// Bytes reserved for a pod's `namespace/name`.
pub const POD_NAME_LEN: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// Ifindex of the pod's host-side veth: packets from this pod's address must arrive there.
    pub host_ifindex: u32,
    /// Length of the name in `name`.
    pub name_len: u32,
    /// `namespace/pod`, UTF-8, truncated to [`POD_NAME_LEN`] bytes.
    pub name: [u8; POD_NAME_LEN],
}

impl PodInfo {
    /// A pod entry; the name is cut at a character boundary to fit.
    #[must_use]
    pub fn new(host_ifindex: u32, name: &str) -> Self {
        let mut len = name.len().min(POD_NAME_LEN);
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        let mut bytes = [0u8; POD_NAME_LEN];
        bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        Self {
            host_ifindex,
            name_len: len as u32,
            name: bytes,
        }
    }

    /// The pod's name (empty when registered without one).
    #[must_use]
    pub fn name(&self) -> &str {
        let len = (self.name_len as usize).min(POD_NAME_LEN);
        core::str::from_utf8(&self.name[..len]).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_truncate_on_char_boundaries() {
        assert_eq!(PodInfo::new(3, "default/web-0").name(), "default/web-0");
        assert_eq!(PodInfo::new(3, "").name(), "");
        let long = "é".repeat(40); // 80 bytes
        let pod = PodInfo::new(3, &long);
        assert_eq!(pod.name().len(), 64);
        assert!(pod.name().chars().all(|c| c == 'é'));
    }
}
