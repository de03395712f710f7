/* placeholder: the daemon's main is being written */
int main (void) { return 1; }
