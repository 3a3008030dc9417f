//! `touch`: a proxy saw real user activity (e.g. VNC key or pointer events
//! inside TLS or websocket framing, which the kernel cannot tell apart from
//! keepalives); the session's idle clock starts again.

#![forbid(unsafe_code)]

use super::Caller;
use crate::daemon::core::model::{internal, Granted, Refused};
use crate::daemon::core::Core;
use crate::kernel::Kernel;
use crate::protocol::Op;

impl<K: Kernel> Core<K> {
    pub(super) fn touch(&mut self, name: &str, caller: Caller) -> Result<Granted, Refused> {
        let now = self.kernel.now();
        let id = self.session_id(Op::Touch, name)?;
        self.check_scope(Op::Touch, caller, id)?;
        let mut record = self.index.session(id).expect("found by name").record();
        record.touched_ns = now.boot_ns;
        self.kernel.put_session(id, &record).map_err(internal)?;
        self.index
            .session_mut(id)
            .expect("found by name")
            .terms
            .touched_ns = now.boot_ns;
        Ok(self.granted(id, now))
    }
}
