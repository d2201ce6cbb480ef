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

/// Checks a pod name given on the command line: `NAMESPACE/POD` as Kubernetes spells them
/// (a DNS label, a DNS subdomain), at most [`POD_NAME_LEN`] bytes so it is stored whole.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.len() > POD_NAME_LEN {
        return Err("is longer than the 64 bytes stored");
    }
    let Some((namespace, pod)) = name.split_once('/') else {
        return Err("is not NAMESPACE/POD");
    };
    let lower_alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let edges_ok = |s: &str| {
        s.bytes().next().is_some_and(lower_alnum) && s.bytes().last().is_some_and(lower_alnum)
    };
    if !edges_ok(namespace) || !namespace.bytes().all(|c| lower_alnum(c) || c == b'-') {
        return Err("has a namespace that is not a DNS label (lower-case letters, digits, '-')");
    }
    if !edges_ok(pod)
        || !pod
            .bytes()
            .all(|c| lower_alnum(c) || c == b'-' || c == b'.')
    {
        return Err(
            "has a pod name that is not a DNS subdomain (lower-case letters, digits, '-', '.')",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_namespace_slash_pod_and_fit() {
        assert_eq!(check_name("default/web-0"), Ok(()));
        assert_eq!(check_name("kube-system/coredns-5d78c9869d-x2x.a"), Ok(()));
        for bad in [
            "web-0",
            "/web-0",
            "default/",
            "Default/web-0",
            "default/web_0",
            "default/a/b",
            "-ns/web",
            "default/web-",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let long = "default/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        assert_eq!(long.len(), 65);
        assert!(check_name(long).unwrap_err().contains("64 bytes"));
        assert_eq!(check_name(&long[..64]), Ok(()));
    }

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
