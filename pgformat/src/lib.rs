//! pitr-pgformat: PostgreSQL's own formats, as pure functions over bytes and text.
//!
//! Owns LSNs in text form ([`lsn`]), WAL segment numbers and segment file names ([`segment`]),
//! timeline history files, their content and their names ([`timeline`]), the WAL record reader
//! that finds commit/abort records and their times ([`walreader`]), which rows each committed
//! transaction changed ([`changes`], for the change index), and PostgreSQL 17's
//! incremental relation files ([`incremental`]).
//!
//! It does no I/O and knows no sockets, archives or storage: the replication-protocol client is
//! pitr-pgwire, where and under which object names pitr keeps these files is pitr-archive, and
//! rebuilding full files from incremental ones is pitr-restore. It depends on no other pitr crate.

#![deny(missing_docs)]

pub mod changes;
pub mod incremental;
pub mod lsn;
pub mod segment;
pub mod timeline;
pub mod walreader;
